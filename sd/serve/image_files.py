"""Pictures kept for a while so that a client can fetch them by URL (the OpenAI Images API's
`response_format: "url"`), as OpenAI keeps its own for an hour.

Each picture lives under an unguessable name (192 random bits) for `ttl` seconds; the name is
the whole credential, as in OpenAI's signed URLs, so fetching one needs no API token. At most
`max_bytes` are kept: past that the oldest go first, even before their time is up.
"""

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_TTL = 600.0
DEFAULT_MAX_BYTES = 256 * 2 ** 20
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class ImageFile:
    data: bytes
    media_type: str
    expires: float   # on the store's clock


class ImageFiles:
    """The kept pictures: put() from the threads that build replies, get() from the handlers."""

    def __init__(self, ttl: float = DEFAULT_TTL, public_url: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock=time.monotonic):
        self.ttl, self.max_bytes, self.clock = ttl, max_bytes, clock
        self.public_url = public_url.rstrip("/") if public_url else None  # set behind a proxy that renames the host
        self._files: OrderedDict[str, ImageFile] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def put(self, data: bytes, extension: str) -> str:
        """Keep `data` (a picture in the format `extension` names); its file name."""
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        with self._lock:
            now = self.clock()
            self._files[name] = ImageFile(data, MEDIA_TYPES[extension], now + self.ttl)
            self._bytes += len(data)
            self._drop(lambda oldest, file: oldest != name and (file.expires <= now or self._bytes > self.max_bytes))
        return name

    def get(self, name: str) -> tuple[ImageFile, float] | None:
        """The picture and the seconds it has left, or None once it is gone (or never was)."""
        with self._lock:
            now = self.clock()
            self._drop(lambda oldest, file: file.expires <= now)
            file = self._files.get(name)
        return (file, file.expires - now) if file else None

    def url(self, name: str, base_url: str) -> str:
        """Where the picture is fetched: under `base_url` (what the client itself called), unless
        the server was told its public address."""
        return f"{self.public_url or base_url.rstrip('/')}/v1/images/files/{name}"

    def _drop(self, condition):
        """Drop from the oldest while `condition(name, file)` holds for it (all are kept for the
        same time, so the oldest expire first)."""
        while self._files and condition(*next(iter(self._files.items()))):
            _, file = self._files.popitem(last=False)
            self._bytes -= len(file.data)
