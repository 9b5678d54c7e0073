"""sd's own JSON dialect, under /v1/sd/: `Pipeline.generate`'s arguments as JSON, answered with the
images as base64 PNGs and each image's settings; the catalogue of models, samplers and schedules,
derived from the registries; and jobs a client can follow and cancel (sd/serve/progress.py). The
playground page (sd/serve/static/) talks to this API and nothing else. Nothing here queues,
authenticates or logs (sd/serve/app.py does).

    GET  /v1/sd/models               every model id: mode, inputs it needs, state, defaults
    GET  /v1/sd/samplers             sd.samplers.SAMPLERS: name, citation, options and defaults
    GET  /v1/sd/schedules            sd.schedule.SCHEDULES: name, what its sigmas are
    POST /v1/sd/generate             JSON (FIELDS) -> {"job", "model", "seconds", "images": [{"png", "settings"}]}
    GET  /v1/sd/jobs/{id}            a job's state as JSON
    GET  /v1/sd/jobs/{id}/events     the same as Server-Sent Events, as it changes (sd/serve/progress.py)
    POST /v1/sd/jobs/{id}/cancel     stop it: out of the queue, or at its next step

A generate request may name its job in an `X-Job-Id` header (1 to 64 letters, digits, '-' or '_',
not a job still waiting or running), so that its events can be followed before the POST returns;
without one the server makes an id. Either way the reply carries it (`job`, `X-Job-Id`).

Input is checked strictly before it is queued: JSON types (`true` is not a number, `8.0` not an
integer), unknown fields (a typo would otherwise fall back to a default), then the core's own checks
of the values (`sd.request.check`, on the plain defaults: sampler names and options, schedules,
multiples of 8, strength without an image ...), each error naming the field and the rule.

Errors: the HTTP status and `{"errors": [{"field": NAME or null, "message": "NAME: rule, got ..."}]}`.
400 bad input, 401 token, 404 no such model / job / route, 409 X-Job-Id names a live job, or the job
was cancelled (the generate request's answer), 413 / 408 body too large / slow, 422 a job this device
cannot finish within --timeout, 429 queue full, 499 the client left, 500 a bug (the log has it), 503
weights missing or shutting down, 504 past --timeout.
"""

import base64
import dataclasses
import inspect
import json
import math
import re
import typing
import uuid
from typing import NamedTuple

from ..defaults import Defaults
from ..errors import lone_surrogate
from ..registry import REGISTRY
from .jobs import GenerationJob, GenerationResult, Reply, RequestError
from .progress import KEEP_FINISHED, Followed, Tracker
from .workers_ai import base64_bytes, image_size, parse_json, shown

JSON = "application/json"
MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SEED = 2 ** 64 - 1
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _is_int(v) -> bool:
    return type(v) is int  # bool is a subclass of int, and JSON true is not a number


def _is_number(v) -> bool:
    return type(v) in (int, float)


class Field(NamedTuple):
    rule: str
    ok: typing.Callable[[object], bool]


def whole(low: int, high: int) -> Field:
    return Field(f"must be an integer in [{low}, {high}]", lambda v: _is_int(v) and low <= v <= high)


def number(low: float, high: float) -> Field:
    return Field(f"must be a number in [{low:g}, {high:g}]", lambda v: _is_number(v) and low <= v <= high)


TEXT = Field("must be a string", lambda v: isinstance(v, str))
FLAG = Field("must be true or false", lambda v: isinstance(v, bool))
PICTURE = Field("must be a non-empty base64 string (the bytes of a PNG, JPEG or WebP file; a data: URL is fine)",
                lambda v: isinstance(v, str) and v != "")
PAIR = Field("must be an array of two integers", lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_int, v)))
OPTIONS = Field("must be an object of option names to values", lambda v: isinstance(v, dict))
NUMBERS = Field("must be a non-empty array of numbers",
                lambda v: isinstance(v, list) and bool(v) and all(map(_is_number, v)))
CACHE = Field("must be an integer (the interval) or an object {\"interval\", \"depth\"}",
              lambda v: _is_int(v) or isinstance(v, dict))

# The request's fields: generate()'s keyword arguments that JSON can carry, plus the model.
FIELDS: dict[str, Field] = {
    "model": TEXT, "prompt": TEXT, "negative_prompt": TEXT,
    "width": whole(8, MAX_SIDE), "height": whole(8, MAX_SIDE), "num_steps": whole(1, MAX_STEPS),
    "guidance": number(0, 100), "guidance_rescale": number(0, 1), "seed": whole(0, MAX_SEED),
    "num_images": whole(1, MAX_IMAGES), "sampler": TEXT, "schedule": TEXT, "sampler_options": OPTIONS,
    "sigmas": NUMBERS, "strength": number(0, 1), "image": PICTURE, "mask": PICTURE, "keep_unmasked": FLAG,
    "clip_skip": whole(0, 64), "prompt_style": TEXT, "step_cache": CACHE,
    "original_size": PAIR, "crop_top_left": PAIR, "target_size": PAIR,
}
REQUIRED = ("model", "prompt")
PICTURES = ("image", "mask")
SDXL_ONLY = ("original_size", "crop_top_left", "target_size")  # checked by the pipeline, which knows the family


# ---------------------------------------------------------------- input


def to_job(body: bytes, defaults_of=lambda model: Defaults()) -> GenerationJob:
    """The request body -> the job (fields left out are left out: the model's defaults apply).
    Raises RequestError(400) listing every violation of the schema, or the core's InputError from
    its checks of the values against `defaults_of(model)` (a sampler's options are those of the
    model's own sampler when the request names none)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, f"body: must be a JSON object, got {shown(data)}")
    errors = [f"{name}: required" for name in REQUIRED if name not in data]
    unknown = [name for name in data if name not in FIELDS]
    if unknown:
        errors.append(f"{', '.join(shown(n)[1:-1] for n in unknown[:5])}{', ...' if len(unknown) > 5 else ''}: "
                      f"not {'a field' if len(unknown) == 1 else 'fields'} of /v1/sd/generate "
                      f"(allowed: {', '.join(FIELDS)})")
    errors += [f"{name}: {FIELDS[name].rule}, got {shown(v)}" for name, v in data.items()
               if name in FIELDS and not FIELDS[name].ok(v)]
    for name in ("prompt", "negative_prompt"):
        if isinstance(data.get(name), str) and lone_surrogate(data[name]) is not None:
            errors.append(f"{name}: must be valid Unicode text (it holds a lone surrogate)")
    pictures = {}
    for name in PICTURES:
        if name in data and not errors:
            try:
                pictures[name] = _decoded(data[name], name)
            except RequestError as e:
                errors += e.messages
    if errors:
        raise RequestError(400, errors)
    kwargs = {name: tuple(v) if name in SDXL_ONLY else v for name, v in data.items()
              if name not in PICTURES and name != "model"}
    _check_values(kwargs, set(pictures), defaults_of(data["model"]))
    kwargs.update({name: picture for name, (picture, _) in pictures.items()})
    if "image" in pictures:
        kwargs.update(_sides_of(pictures["image"][1], kwargs))
    return GenerationJob(data["model"], kwargs)


def _decoded(value: str, name: str) -> tuple[bytes, tuple[int, int]]:
    """The picture's bytes and size; the picture decoded once here, so that a broken one is the
    client's 400 and not the worker's 500 (the worker decodes it again: bytes queue smaller)."""
    if value.startswith("data:") and ";base64," in value[:100]:
        value = value.split(";base64,", 1)[1]
    data = base64_bytes(value, name)
    return data, image_size(data, name)  # at most 8192 x 8192


def _check_values(kwargs: dict, pictures: set[str], defaults: Defaults):
    """The core's own checks of the values (sd.request.check), before anything queues: what they
    refuse here, the pipeline would refuse too. Size conditioning is left to the pipeline, which
    knows whether the model is SDXL."""
    from ..request import check
    check(defaults, multiple=8, sdxl=False, has_image="image" in pictures, has_mask="mask" in pictures,
          **{k: v for k, v in kwargs.items() if k not in SDXL_ONLY})


def _sides_of(size: tuple[int, int], kwargs: dict) -> dict:
    """The sides the request left out, from the image: its own rounded down to a multiple of 8 (what
    the pipeline would take), the whole scaled down first when a side passes MAX_SIDE. Written out so
    that the size is known before the job runs (its time estimate, the log)."""
    width, height = size
    scale = min(1.0, MAX_SIDE / max(width, height))
    sides = {"width": int(width * scale) // 8 * 8, "height": int(height * scale) // 8 * 8}
    return {k: v for k, v in sides.items() if k not in kwargs and v >= 8}


def job_id(header: str | None) -> str:
    """The X-Job-Id a client chose, checked, or a new one."""
    if header is None:
        return uuid.uuid4().hex[:16]
    if not JOB_ID.fullmatch(header):
        raise RequestError(400, f"x-job-id: must be 1 to 64 letters, digits, '-' or '_', got {shown(header)}")
    return header


# ---------------------------------------------------------------- replies


def _json(value, status: int = 200, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(value).encode(), JSON, headers or {})


def image_reply(result: GenerationResult, job: str, model: str) -> Reply:
    images = [{"png": base64.b64encode(p.png).decode("ascii"), "settings": p.settings} for p in result.pictures]
    return _json({"job": job, "model": model, "seconds": round(result.seconds, 3), "images": images},
                 headers={"X-Job-Id": job})


def errors_of(messages: list[str]) -> list[dict]:
    """Messages -> [{"field", "message"}]: the field is what a message names before its colon."""
    def field(message: str) -> str | None:
        name = message.split(": ", 1)[0]
        return name if ": " in message and FIELD_NAME.fullmatch(name) else None
    return [{"field": field(m), "message": m} for m in messages]


def error_reply(status: int, messages: list[str], headers: dict | None = None) -> Reply:
    return _json({"errors": errors_of(messages)}, status, headers)


class Generation:
    """The dialect of one POST /v1/sd/generate, for `app.generation`: it reads the body and answers
    as the module does, and tells the job's followers how it ended (in the reply's own words)."""

    def __init__(self, tracker: Tracker, followed: Followed, defaults_of):
        self.tracker, self.followed, self.defaults_of, self.model = tracker, followed, defaults_of, None

    @classmethod
    def claim(cls, service, header: str | None, ref: str) -> "Generation":
        """For the request `ref`: its job, named by its X-Job-Id header or new, claimed before the body
        is read, so that the job's events can be followed from the start."""
        return cls(tracker(service), tracker(service).claim(job_id(header), ref), service.cache.defaults)

    def to_job(self, model, body: bytes, content_type: str) -> GenerationJob:
        job = to_job(body, self.defaults_of)
        self.model = job.model
        return job

    def image_reply(self, result: GenerationResult) -> Reply:
        self.tracker.done(self.followed, result)
        return image_reply(result, self.followed.id, self.model)

    def error_reply(self, status: int, messages: list[str], headers: dict | None = None) -> Reply:
        self.tracker.failed(self.followed, status, errors_of(messages))
        return error_reply(status, messages, {**(headers or {}), "X-Job-Id": self.followed.id})


# ---------------------------------------------------------------- the catalogue


def models_reply(cache) -> Reply:
    """Every model id the server answers for: its mode, the inputs it needs, its state (as /healthz
    says it), and its generation defaults (the loaded pipeline's, else the registry's)."""
    def entry(spec):
        state = cache.state(spec.id)
        return {"id": spec.id, "description": spec.description, "mode": spec.mode, "needs": list(spec.needs),
                "state": state, "present": state in ("loaded", "ready"),
                "defaults": dataclasses.asdict(cache.defaults(spec.id))}
    return _json({"models": [entry(spec) for spec in REGISTRY.values()]})


def _plain(value):
    """A default JSON can carry: infinities as the strings Python prints."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def samplers_reply() -> Reply:
    """sd.samplers.SAMPLERS: each sampler's name, citation, diffusers twin and options (default, and
    the choices a Literal annotation allows); the aliases, each a sampler on a schedule."""
    from ..samplers import ALIASES, SAMPLERS

    def options(spec):
        params = inspect.signature(spec.fn).parameters
        out = []
        for name, default in spec.options.items():
            kind = params[name].annotation
            choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
            out.append({"name": name, "default": _plain(default), **({"choices": list(choices)} if choices else {})})
        return out

    return _json({"samplers": [{"name": s.name, "citation": s.cite, "twin": s.twin, "options": options(s)}
                               for s in SAMPLERS.values()],
                  "aliases": [{"name": a, "sampler": name, "schedule": schedule}
                              for a, (name, schedule) in ALIASES.items()]})


def schedules_reply() -> Reply:
    """sd.schedule.SCHEDULES: each schedule's name and the first line of its docstring."""
    from ..schedule import SCHEDULES
    return _json({"schedules": [{"name": name, "description": (fn.__doc__ or "").strip().split("\n")[0] if fn else
                                 "the sampler's own: its diffusers twin's timesteps on the model's spacing"}
                                for name, fn in SCHEDULES.items()]})


# ---------------------------------------------------------------- the endpoints: (request, service) -> reply


def tracker(service) -> Tracker:
    """The service's followed jobs, made on first use (on the event loop)."""
    if service.jobs is None:
        service.jobs = Tracker(service.worker)
    return service.jobs


async def models(request, service) -> Reply:
    return models_reply(service.cache)


async def samplers(request, service) -> Reply:
    return samplers_reply()


async def schedules(request, service) -> Reply:
    return schedules_reply()


def _followed(request, service) -> Followed:
    name = request.path_params["job"]
    job = tracker(service).jobs.get(name)
    if job is None or job.ref is None:
        raise RequestError(404, f"job: no job {shown(name)} (a finished job is kept until {KEEP_FINISHED} newer "
                                "ones have finished)")
    return job


async def job_state(request, service) -> Reply:
    return _json(_followed(request, service).snapshot())


async def job_cancel(request, service) -> Reply:
    """202: the job is out of the queue, or stops at its next step (its events end with `stopped`);
    a job that had already finished is left as it was."""
    return _json(tracker(service).cancel(_followed(request, service)), 202)


async def job_events(request, service):
    """text/event-stream, its follower registered before the headers go out. An id that names no job
    yet is waited for (progress.CLAIM_WAIT): a client may subscribe, read the headers, then send the
    generate request that names the job, and miss none of its events."""
    name = request.path_params["job"]
    if not JOB_ID.fullmatch(name):
        raise RequestError(404, f"job: no job {shown(name)} (ids are 1 to 64 letters, digits, '-' or '_')")
    return tracker(service).follow(name)
