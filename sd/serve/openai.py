"""The OpenAI Images API dialect: its generations (JSON) and edits (multipart) -> GenerationJob,
and results, errors and the model list -> OpenAI's replies. Nothing here queues, authenticates
or logs; app.py makes one Dialect per request.

    POST /v1/images/generations    JSON: prompt (required), model, n, size, response_format,
                                   output_format, output_compression, user ...
    POST /v1/images/edits          multipart: image (one file), mask, prompt (required), and the same fields
    GET  /v1/models[/{model}]      the served models (those whose weights are here)
    GET  /v1/images/files/{name}   a picture answered as a URL, while it is kept (sd/serve/image_files.py)

Fields, checked strictly before a request is queued (null is the same as leaving a field out,
as in OpenAI's schema, except for `prompt` and `user`; in a multipart body an empty value is null):

    prompt              string of 1 to 32000 characters
    model               a served id (GET /v1/models); left out: the default model, the first of
                        sd/registry.py's ids whose weights are here
    n                   integer in [1, 10]: the pictures come from one batch, seeds s..s+n-1
    size                "auto" (the model's default; for edits, the image's size) or "WxH", each side
                        a multiple of 8 in [256, 2048]
    response_format     "b64_json" (default) or "url" (kept --url-ttl seconds; refused when 0)
    output_format       "png" (default, the settings written in as `sd generate` writes them),
                        "jpeg" or "webp"
    output_compression  integer in [0, 100], the JPEG / WebP quality (default 100); jpeg and webp only
    user, safety_identifier, moderation ("auto" or "low": sd filters nothing)   accepted, no effect
    background ("auto", "opaque"), quality ("auto", "standard"), style ("vivid"), stream (false),
    partial_images (0), input_fidelity ("low", edits)   their defaults only: other values ask for
                        what sd does not do, and are refused naming the field
    complexity, frame_count, frame_duration_ms, svg, markup   refused unless null (GIF, SVG ...)

sd's own fields, for what the OpenAI schema has no name for: negative_prompt, num_steps
(1-150), guidance (0-100), seed (0 to 2^64-1; each picture's seed comes back in its `seed`), and,
for edits, strength (0-1; default 0.8 for a whole-picture edit, 1 with a mask).

Edits follow OpenAI's mask convention: the mask's fully transparent pixels (alpha 0) are the
ones to repaint; it must be the image's size and have an alpha channel. Without a mask, the
image's own transparent pixels are the mask (as DALL-E 2 did); a fully opaque image without a
mask is edited whole (image to image at `strength`).

Replies: {"created", "data": [{"b64_json" | "url", "seed"}], "background": "opaque",
"output_format", "size"}. Errors: OpenAI's envelope {"error": {"message", "type", "param",
"code"}}, the message naming the field and the rule (several violations: all of them, `param`
the first's):

    status  type                   code
    400     invalid_request_error  missing_required_parameter, unknown_parameter, invalid_value
    401     invalid_request_error  invalid_api_key
    404     invalid_request_error  model_not_found (an unknown model), null (no route, a picture gone)
    408, 413, 422   invalid_request_error
    429     requests               rate_limit_exceeded (the queue is full; Retry-After: 1)
    5xx     server_error           null (504 adds x-should-retry: false: the job ran out of time)
"""

import base64
import io
import json
import math
import re
import time
from urllib.parse import urlsplit

from ..errors import lone_surrogate
from ..registry import REGISTRY
from . import multipart
from .image_files import ImageFiles
from .jobs import GenerationJob, GenerationResult, Reply, RequestError
from .workers_ai import MAX_SIDE, MIN_SIDE, _fitted_sides, image_size, parse_json, shown

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
MAX_PROMPT = 32000          # OpenAI's limit for its GPT image models
MAX_IMAGES = 10
MAX_STEPS = 150             # AUTOMATIC1111's bound; the time model refuses what cannot finish in time
MAX_SEED = 2 ** 64 - 1
EDIT_STRENGTH = 0.8         # a whole-picture edit keeps the composition (diffusers' img2img default)
JSON = "application/json"
REQUIRED, UNKNOWN = "required", "unknown parameter"  # how those rules start: their codes are read from it


# ---------------------------------------------------------------- the rules of the fields


class Invalid(ValueError):
    """A value that breaks its field's rule; the message is the rule and what came."""


def _text(lo: int = 0, hi: int = MAX_PROMPT):
    def check(v):
        if not isinstance(v, str) or not lo <= len(v) <= hi:
            raise Invalid(f"must be a string of {lo} to {hi} characters, got {shown(v)}")
        at = lone_surrogate(v)
        if at is not None:
            raise Invalid(f"must be valid Unicode text, got a lone surrogate at index {at}")
        return v
    return check


def _integer(lo: int, hi: int):
    def check(v):
        if type(v) is not int or not lo <= v <= hi:  # bool is an int to Python, not to JSON
            raise Invalid(f"must be an integer in [{lo}, {hi}], got {shown(v)}")
        return v
    return check


def _number(lo: float, hi: float):
    def check(v):
        if type(v) not in (int, float) or not lo <= v <= hi:
            raise Invalid(f"must be a number in [{lo:g}, {hi:g}], got {shown(v)}")
        return float(v)
    return check


def _one_of(*values, why: str = ""):
    """Only these values (a documented field's default, or what sd does)."""
    def check(v):
        if not any(type(v) is type(x) and v == x for x in values):  # JSON's false is not 0
            listed = ", ".join(json.dumps(x) for x in values)
            raise Invalid(f"invalid value {shown(v)}; supported here: {listed}" + (f" ({why})" if why else ""))
        return v
    return check


def _never(why: str):
    """A documented field for what sd does not do: only null (left out) is accepted."""
    def check(v):
        raise Invalid(f"not supported: {why}")
    return check


def _size(v):
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", v) if isinstance(v, str) else None
    sides = tuple(map(int, match.groups())) if match else ()
    if v != "auto" and not (sides and all(MIN_SIDE <= s <= MAX_SIDE and s % 8 == 0 for s in sides)):
        raise Invalid(f'must be "auto" or "WIDTHxHEIGHT", each side a multiple of 8 in [{MIN_SIDE}, {MAX_SIDE}] '
                      f'(e.g. "1024x1024"), got {shown(v)}')
    return sides or None


# field -> (check, nullable). Values are checked as JSON gives them; a multipart body's text is
# first read as JSON would carry it (_typed).
COMMON = {
    "prompt": (_text(1), False),
    "model": (_text(1, 200), True),
    "n": (_integer(1, MAX_IMAGES), True),
    "size": (_size, True),
    "response_format": (_one_of("b64_json", "url"), True),
    "output_format": (_one_of("png", "jpeg", "webp", why="GIF and SVG are not formats sd writes"), True),
    "output_compression": (_integer(0, 100), True),
    "user": (_text(0), False),
    "safety_identifier": (_text(0), True),
    "moderation": (_one_of("auto", "low", why="sd filters nothing either way"), True),
    "background": (_one_of("auto", "opaque", why="sd's pictures have no transparency"), True),
    "quality": (_one_of("auto", "standard", why="a model has one quality here; num_steps trades time for "
                                                "detail"), True),
    "stream": (_one_of(False, why="sd answers when the pictures are done"), True),
    "partial_images": (_one_of(0, why="sd does not stream"), True),
    "complexity": (_never("sd does no planning pass; describe the picture in the prompt"), True),
    "frame_count": (_never("sd makes no GIFs"), True),
    "frame_duration_ms": (_never("sd makes no GIFs"), True),
    "svg": (_never("sd makes no SVGs"), True),
    # sd's own
    "negative_prompt": (_text(0), True),
    "num_steps": (_integer(1, MAX_STEPS), True),
    "guidance": (_number(0, 100), True),
    "seed": (_integer(0, MAX_SEED), True),
}
GENERATION_FIELDS = {**COMMON, "style": (_one_of("vivid", why="describe the style in the prompt"), True)}
EDIT_FIELDS = {**COMMON, "input_fidelity": (_one_of("low", why="sd has one fidelity to its input: strength sets "
                                                                   "how far it may go"), True),
               "strength": (_number(0, 1), True)}
EDIT_FILES = ("image", "mask", "markup")  # markup: a guide drawing, which sd does not take
# The core's names for what OpenAI's fields set, so that its errors name the field the client sent.
CORE_NAMES = {"width": "size", "height": "size", "num_images": "n"}


NUMBERS = ("n", "output_compression", "partial_images", "frame_count", "frame_duration_ms", "num_steps", "guidance",
           "seed", "strength")


def _typed(name: str, text: str):
    """A multipart field's text as JSON would carry its value: a number for a numeric field
    (when it reads as one), true / false for stream, else the text."""
    if name in NUMBERS and re.fullmatch(r"-?[0-9]{1,30}", text):
        return int(text)
    if name in NUMBERS and re.fullmatch(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,3})?", text):
        value = float(text)
        return value if math.isfinite(value) else text
    if name == "stream":
        return {"true": True, "false": False}.get(text, text)
    return text


def _checked(data: dict, rules: dict, files: tuple = ()) -> tuple[dict, list[str]]:
    """The fields given (null ones left out), and every violation, `param: rule`, in the order of `rules`."""
    errors = [f"{shown(name)[1:-1]}: {UNKNOWN} (accepted: {', '.join([*rules, *files])})"
              for name in data if name not in rules and name not in files]
    if "prompt" not in data:
        errors.append(f"prompt: {REQUIRED} (a string of 1 to {MAX_PROMPT} characters)")
    out = {}
    for name, (check, nullable) in rules.items():
        if name not in data or (data[name] is None and nullable):
            continue
        try:
            out[name] = check(data[name])
        except Invalid as e:
            errors.append(f"{name}: {e}")
    if out.get("output_compression") is not None and out.get("output_format", "png") == "png":
        errors.append("output_compression: only for output_format jpeg or webp (PNG is lossless)")
    return out, errors


# ---------------------------------------------------------------- one request


def served_models(registry) -> list[str]:
    """The registry's ids whose weights are here, in its order; the first is the default model."""
    return [model for model in REGISTRY if not registry.missing(model)]


class Dialect:
    """One request to an /v1/ route: what `generation()` calls (to_job, image_reply, error_reply)
    and the answers to the GET routes. Holds what the reply needs from the request."""

    def __init__(self, path: str, registry, files: ImageFiles, base_url: str):
        self.path, self.registry, self.files, self.base_url = path, registry, files, base_url
        self.fields: dict = {}

    # ------------------------------------------------------------ POST

    def to_job(self, model: str | None, body: bytes, content_type: str = JSON) -> GenerationJob:
        """The request's body -> its job (the model is named in the body: `model` is None);
        RequestError(400) listing every violation."""
        if self.path == EDITS:
            fields, errors, pictures = self._edit_fields(body, content_type)
        else:
            data = parse_json(body)
            if not isinstance(data, dict):
                raise RequestError(400, f"body: must be a JSON object, got {shown(data)}")
            (fields, errors), pictures = _checked(data, GENERATION_FIELDS), {}
        if fields.get("response_format") == "url":
            errors += self._url_problems()
        if errors:
            raise RequestError(400, errors)
        self.fields = fields
        served = served_models(self.registry)
        model = fields.get("model") or (served[0] if served else next(iter(REGISTRY)))
        kwargs = {"prompt": fields["prompt"], "num_images": fields.get("n", 1), **pictures}
        kwargs.update({name: fields[name] for name in ("negative_prompt", "num_steps", "guidance", "seed", "strength")
                       if name in fields})
        if fields.get("size"):
            kwargs["width"], kwargs["height"] = fields["size"]
        return GenerationJob(model, kwargs)

    def _url_problems(self) -> list[str]:
        if not self.files.enabled:
            return ['response_format: "url" is off on this server (--url-ttl 0); use "b64_json"']
        host = urlsplit(self.base_url).netloc
        if not self.files.public_url and not re.fullmatch(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?", host):
            return [f'response_format: "url" needs a Host header that names this server, got {shown(host)}']
        return []

    def _edit_fields(self, body: bytes, content_type: str) -> tuple[dict, list[str], dict]:
        data, files = {}, {}
        for part in multipart.parse(body, content_type):
            # the official client names each file of a list image[]
            name = part.name.removesuffix("[]") if part.name in ("image[]", "mask[]") else part.name
            if name in EDIT_FILES:
                files.setdefault(name, []).append(part)
            elif name in data:
                raise RequestError(400, f"{shown(name)[1:-1]}: given more than once")
            elif part.filename is not None:
                raise RequestError(400, f"{shown(name)[1:-1]}: must be a plain field, not a file")
            else:
                data[name] = self._field_text(name, part.data)
        fields, errors = _checked(data, EDIT_FIELDS, EDIT_FILES)
        pictures = self._edit_pictures(files, fields, errors)
        return fields, errors, pictures

    @staticmethod
    def _field_text(name: str, raw: bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(400, f"{shown(name)[1:-1]}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if text == "" and EDIT_FIELDS.get(name, (None, True))[1]:
            return None  # how the official client sends None
        return _typed(name, text)

    def _edit_pictures(self, files: dict, fields: dict, errors: list[str]) -> dict:
        """"image" (and "mask": sd's white-is-repaint picture) for the pipeline, checked."""
        if files.get("markup"):
            errors.append("markup: not supported: sd takes no guide drawing; send a mask")
        images, masks = files.get("image", []), files.get("mask", [])
        if not images:
            errors.append(f"image: {REQUIRED} (one PNG, JPEG or WebP file)")
        elif len(images) > 1:
            errors.append(f"image: one picture only (sd edits one at a time), got {len(images)}")
        if len(masks) > 1:
            errors.append(f"mask: one only, got {len(masks)}")
        for name, parts in (("image", images), ("mask", masks)):
            if parts and parts[0].filename is None:
                errors.append(f"{name}: must be a file (a part with a filename), not a plain field")
        if errors or not images:
            return {}
        image = images[0].data
        try:
            size = image_size(image, "image")
            mask = _repaint_mask(masks[0].data, size) if masks else _own_transparency(image)
        except RequestError as e:
            errors.extend(e.messages)
            return {}
        out = {"image": image, **({"mask": mask} if mask else {})}
        if not mask and "strength" not in fields:
            out["strength"] = EDIT_STRENGTH
        if not fields.get("size"):
            out.update(_fitted_sides(size, None, None))
        return out

    # ------------------------------------------------------------ replies

    def image_reply(self, result: GenerationResult) -> Reply:
        fmt = self.fields.get("output_format") or "png"
        quality = self.fields.get("output_compression")
        data = []
        for picture in result.pictures:
            encoded = _encoded(picture.png, fmt, 100 if quality is None else quality)
            item = ({"url": self.files.url(self.files.put(encoded, fmt), self.base_url)}
                    if self.fields.get("response_format") == "url" else
                    {"b64_json": base64.b64encode(encoded).decode("ascii")})
            data.append({**item, "seed": picture.settings["seed"]})
        reply = {"created": int(time.time()), "data": data, "background": "opaque", "output_format": fmt}
        if settings := result.settings:  # none when a job was stopped before its first picture
            reply["size"] = f"{settings['width']}x{settings['height']}"
        return _reply(200, reply)

    @staticmethod
    def error_reply(status: int, messages: list[str], headers: dict | None = None) -> Reply:
        return error_reply(status, messages, headers)

    # ------------------------------------------------------------ GET

    def lookup(self, params: dict) -> Reply:
        """GET /v1/models, /v1/models/{model}, /v1/images/files/{name}."""
        if "name" in params:
            found = self.files.get(params["name"])
            if found is None:
                raise RequestError(404, f"{params['name'][:80]!r}: no such picture (pictures asked for as a URL "
                                        f"are kept {self.files.ttl:g} s)")
            file, seconds_left = found
            return Reply(200, file.data, file.media_type, {"Cache-Control": f"private, max-age={int(seconds_left)}"})
        served = served_models(self.registry)
        if "model" not in params:
            return _reply(200, {"object": "list", "data": [_model(m) for m in served]})
        if params["model"] not in served:
            raise RequestError(404, f"model: {params['model'][:200]!r} is not served here (served: "
                                    f"{', '.join(served) or 'none: no weights are here'})")
        return _reply(200, _model(params["model"]))


def _model(model: str) -> dict:
    return {"id": model, "object": "model", "created": 0, "owned_by": model.split("/")[1]}


def _own_transparency(image: bytes) -> bytes | None:
    """DALL-E 2's convention: an edit without a mask repaints the image's transparent pixels."""
    from PIL import Image
    with Image.open(io.BytesIO(image)) as picture:
        alpha = _alpha(picture)
        return _white_where_clear(alpha) if alpha is not None and alpha.getextrema()[0] == 0 else None


def _repaint_mask(data: bytes, size: tuple[int, int]) -> bytes:
    """OpenAI's mask (transparent = edit) -> sd's (white = repaint), checked against the image."""
    from PIL import Image
    mask_size = image_size(data, "mask")
    if mask_size != size:
        raise RequestError(400, f"mask: must be the image's size, {size[0]}x{size[1]}, got "
                                f"{mask_size[0]}x{mask_size[1]}")
    with Image.open(io.BytesIO(data)) as picture:
        alpha = _alpha(picture)
    if alpha is None:
        raise RequestError(400, "mask: has no alpha channel; the pixels to edit are the fully transparent "
                                "ones (alpha 0), as in OpenAI's API")
    if alpha.getextrema()[0] != 0:
        raise RequestError(400, "mask: no pixel is fully transparent (alpha 0), so there is nothing to edit")
    return _white_where_clear(alpha)


def _alpha(picture):
    """The picture's alpha channel (EXIF orientation applied, as the pipeline sees the image), or None."""
    from PIL import ImageOps
    picture = ImageOps.exif_transpose(picture)
    if picture.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in picture.info:
        return None
    return picture.convert("RGBA").getchannel("A")


def _white_where_clear(alpha) -> bytes:
    buf = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(buf, format="PNG")
    return buf.getvalue()


def _encoded(png: bytes, fmt: str, quality: int) -> bytes:
    if fmt == "png":
        return png
    from PIL import Image
    buf = io.BytesIO()
    with Image.open(io.BytesIO(png)) as picture:
        picture.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- the envelope


TYPES = {429: "requests"}
CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
KNOWN_PARAMS = {*GENERATION_FIELDS, *EDIT_FIELDS, *EDIT_FILES}


def error_reply(status: int, messages: list[str], headers: dict | None = None) -> Reply:
    """OpenAI's envelope: one error; `param` the field the first message names (`field: rule`)."""
    name, _, rule = messages[0].partition(": ")
    name = CORE_NAMES.get(name, name)
    param = name if name in KNOWN_PARAMS or (status == 400 and rule.startswith(UNKNOWN)) else None
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = CODES.get(status)
    if status == 400:
        code = ("missing_required_parameter" if rule.startswith(REQUIRED) else
                "unknown_parameter" if rule.startswith(UNKNOWN) else "invalid_value")
    elif status == 404 and param == "model":
        code = "model_not_found"
    headers = dict(headers or {})
    if status == 504:
        headers["x-should-retry"] = "false"  # it ran out of time: the client's retries would run it again
    return _reply(status, {"error": {"message": "; ".join(messages), "type": kind, "param": param, "code": code}},
                  headers)


def _reply(status: int, value: dict, headers: dict | None = None) -> Reply:
    return Reply(status, json.dumps(value).encode(), JSON, headers or {})
