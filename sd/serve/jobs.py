"""What every API dialect hands the worker and gets back, and the errors it translates.

A dialect (sd/serve/workers_ai.py, ...) turns its request into a GenerationJob and turns a
GenerationResult, or an exception, into its own reply; nothing else in the service layer
knows a dialect's shapes.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerationJob:
    """One generation in the core's terms: a registry model id and the keyword arguments of
    `Pipeline.generate` (prompt included); what they leave out takes the model's defaults."""
    model: str
    kwargs: dict


@dataclass(frozen=True)
class Picture:
    png: bytes          # the image, its settings written in the PNG as the CLI writes them (sd.pngmeta)
    settings: dict      # image.info["sd"]: what reproduces it, the seed included


@dataclass(frozen=True)
class GenerationResult:
    pictures: list[Picture]  # one per image the job asked for (num_images), in order; fewer if stopped
    seconds: float           # time in the worker (loading, generating, encoding)

    @property
    def png(self) -> bytes:
        return self.pictures[0].png

    @property
    def settings(self) -> dict:
        return self.pictures[0].settings if self.pictures else {}  # none: stopped before its first step


class RequestError(Exception):
    """An answer other than 200 that the service layer decides: a status, one or more messages
    (each naming the field or limit and the rule), extra headers."""

    def __init__(self, status: int, messages: str | list[str], headers: dict | None = None):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("; ".join(self.messages))
        self.status, self.headers = status, dict(headers or {})


@dataclass(frozen=True)
class Reply:
    """A dialect's answer, independent of the web framework."""
    status: int
    body: bytes
    media_type: str
    headers: dict = field(default_factory=dict)
