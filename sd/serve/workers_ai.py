"""The Workers AI dialect: Cloudflare's text-to-image JSON -> GenerationJob, and results, errors
and the model search -> Cloudflare's replies. Nothing here queues, authenticates or logs.

Input: the Workers AI text-to-image JSON schema, checked strictly before a request is queued:

    prompt           string, at least 1 character (required)
    negative_prompt  string
    width, height    integer in [256, 2048] (the pipeline also wants a multiple of 8)
    image, mask      array of integers in [0, 255]: the bytes of an image file (PNG, JPEG, WebP ...)
    image_b64        string: those bytes in base64 (a `data:...;base64,` prefix and line breaks are
                     allowed); giving both `image` and `image_b64` is an error, not a silent choice
    num_steps        integer in [1, 20]
    strength         number in [0, 1]; only used with an image (checked, then ignored without one)
    guidance         number in [0, 100]
    seed             integer in [0, 2**64)

JSON `true`/`false` are not numbers, `256.0` is not an integer, `null` is not an omitted field,
NaN / Infinity / 1e999 are rejected, and unknown fields are an error (a typo such as `steps`
would otherwise silently fall back to the default). Omitted fields take the model's defaults
(sd/registry.py); with an image, omitted sides are the image's, scaled down to fit 2048. Images
are at most 8192 x 8192 pixels.

Output: 200 with the PNG (its settings in the `sd` and `parameters` text chunks, as `sd generate`
writes them) and `X-Seed: <seed>`, so a request without a seed can be made again.

Errors come as Cloudflare's envelope `{"success": false, "errors": [{"code": N, "message": "..."}],
"messages": [], "result": null}`; every schema violation is listed, each naming the field and rule.

    status  code   when
    400     5006   the body is not a JSON object, a field breaks the schema, or the pipeline refuses
                   the input (e.g. width not a multiple of 8, inpainting without a mask)
    401     10000  a token is configured (--api-token / SD_API_TOKEN) and `Authorization: Bearer`
                   does not carry it
    404     5007   no such model;  7000: no such route
    405     7001   wrong method
    408     5408   the body did not arrive within --read-timeout (the connection is then closed)
    413     5413   body over --max-body-mb (Content-Length checked up front, streamed bytes counted)
    422     5422   the job would take far longer than --timeout on this device (the message names the
                   size, the steps and the largest size that fits)
    429     3040   the queue is full (--queue-size requests wait behind the one running)
    500     5500   anything else; the message is generic with the request id, the traceback goes to
                   the server log
    503     5503   the model's weights are not on disk (the message says which `sd download` fetches
                   them) or are not a readable checkpoint, or the server is shutting down
    504     5504   --timeout seconds passed (waiting plus running); the job stops within a UNet block

5006, 5007, 3040, 7000, 7001 and 10000 are the codes Cloudflare's API uses for these cases; the
others are 5000 + the status.
"""

import base64
import binascii
import io
import json
import math

from ..errors import lone_surrogate
from ..registry import ModelSpec
from .jobs import GenerationJob, GenerationResult, Reply, RequestError

MIN_SIDE, MAX_SIDE = 256, 2048
MAX_STEPS = 20
MAX_GUIDANCE = 100
MAX_SEED = 2 ** 64 - 1
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_DIGITS = 100            # a longer JSON number is an error, not a big-integer parse
# HTTP status -> the envelope's error code (Cloudflare's own where it has one).
CODES = {400: 5006, 401: 10000, 404: 5007, 405: 7001, 429: 3040}
NO_ROUTE = 7000
FIELDS = ("prompt", "negative_prompt", "height", "width", "image", "image_b64", "mask", "num_steps", "strength",
          "guidance", "seed")
JSON = "application/json"


def code_of(status: int) -> int:
    return CODES.get(status, 5000 + status)


def envelope(messages: list[str], code: int) -> dict:
    return {"success": False, "errors": [{"code": code, "message": m} for m in messages], "messages": [],
            "result": None}


# ---------------------------------------------------------------- replies


def image_reply(result: GenerationResult) -> Reply:
    return Reply(200, result.png, "image/png", {"X-Seed": str(result.settings["seed"])})


def error_reply(status: int, messages: list[str], headers: dict | None = None, *, route: bool = False) -> Reply:
    """`route`: the path itself matched nothing (Cloudflare's 7000), not a model that doesn't exist."""
    code = NO_ROUTE if route and status == 404 else code_of(status)
    return Reply(status, _json(envelope(messages, code)), JSON, headers or {})


def _json(value) -> bytes:
    return json.dumps(value).encode()


# ---------------------------------------------------------------- input


class _BadNumber(ValueError):
    pass


def _reject_constant(name: str):
    raise _BadNumber(f"{name} is not a number JSON allows")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"{text[:20]} is too large a number")
    return value


def _parse_int(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise _BadNumber(f"a number with {len(text)} digits (at most {MAX_DIGITS})")
    return int(text)


def shown(value) -> str:
    """A short rendering of a client's value for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, str):
        return json.dumps(value[:40] + ("..." if len(value) > 40 else ""))
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(v) -> bool:
    return type(v) is int  # bool is a subclass of int, and JSON true is not a number


def _is_number(v) -> bool:
    return type(v) in (int, float)


def parse_json(body: bytes):
    if not body.strip():
        raise RequestError(400, "body: empty; expected a JSON object such as {\"prompt\": \"a cat\"}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"body: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float, parse_int=_parse_int)
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, _BadNumber
        raise RequestError(400, f"body: not valid JSON: {e}") from None


def _image_bytes(value, name: str, errors: list[str]) -> bytes | None:
    rule = f"{name}: must be an array of integers in [0, 255] (the bytes of an image file)"
    if not isinstance(value, list) or not value:
        errors.append(f"{rule}, got {shown(value)}")
        return None
    for i, v in enumerate(value):
        if not _is_int(v) or not 0 <= v <= 255:
            errors.append(f"{rule}, got {shown(v)} at index {i}")
            return None
    return bytes(value)


def _b64_bytes(value, errors: list[str]) -> bytes | None:
    if not isinstance(value, str) or not value:
        errors.append(f"image_b64: must be a non-empty base64 string (the bytes of an image file), got {shown(value)}")
        return None
    if value.startswith("data:") and ";base64," in value[:100]:
        value = value.split(";base64,", 1)[1]
    try:
        return base64_bytes(value, "image_b64")
    except RequestError as e:
        errors.extend(e.messages)
        return None


def base64_bytes(value: str, name: str) -> bytes:
    """A base64 field's bytes, whitespace and line breaks ignored; a 400 naming the field when it
    is not base64 or decodes to nothing."""
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{name}: not valid base64 ({e})") from None
    if not data:
        raise RequestError(400, f"{name}: decodes to no bytes")
    return data


EXIF_ORIENTATION, TURNED = 0x0112, (5, 6, 7, 8)  # orientations that swap width and height


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """Decode the picture once here, so that anything wrong with it is the client's 400 and not a
    failure in the worker; the size as the pipeline will see it (EXIF orientation applied). The
    worker decodes it again (the bytes are smaller to keep in the queue)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise RequestError(400, f"{name}: must have at most {MAX_IMAGE_PIXELS} pixels (8192 x 8192), "
                                        f"got {width}x{height}")
            image.load()
            turned = image.getexif().get(EXIF_ORIENTATION) in TURNED
    except RequestError:
        raise
    except Exception as e:  # PIL raises many kinds on broken files; all mean the same to the client
        kind = "image too large" if "decompression bomb" in str(e).lower() else type(e).__name__
        raise RequestError(400, f"{name}: not a readable image (PNG, JPEG or WebP expected; {kind})") from None
    return (height, width) if turned else (width, height)


def _text_ok(name: str, text: str, errors: list[str]) -> bool:
    at = lone_surrogate(text)
    if at is not None:
        errors.append(f"{name}: must be valid Unicode text, got a lone surrogate at index {at}")
    return at is None


def _fields(data: dict, errors: list[str]) -> dict:
    """The schema's scalar fields, checked; violations appended to `errors`."""
    out = {}
    unknown = [name for name in data if name not in FIELDS]
    if unknown:
        names = ", ".join(shown(name)[1:-1] for name in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        errors.append(f"{names}: not {'an input' if len(unknown) == 1 else 'inputs'} of text-to-image models "
                      f"(allowed: {', '.join(FIELDS)})")
    if "prompt" not in data:
        errors.append("prompt: required (a string of at least 1 character)")
    elif not isinstance(data["prompt"], str) or not data["prompt"]:
        errors.append(f"prompt: must be a string of at least 1 character, got {shown(data['prompt'])}")
    elif _text_ok("prompt", data["prompt"], errors):
        out["prompt"] = data["prompt"]
    if "negative_prompt" in data:
        if not isinstance(data["negative_prompt"], str):
            errors.append(f"negative_prompt: must be a string, got {shown(data['negative_prompt'])}")
        elif _text_ok("negative_prompt", data["negative_prompt"], errors):
            out["negative_prompt"] = data["negative_prompt"]
    ranges = {"width": (MIN_SIDE, MAX_SIDE), "height": (MIN_SIDE, MAX_SIDE), "num_steps": (1, MAX_STEPS),
              "seed": (0, MAX_SEED)}
    for name, (lo, hi) in ranges.items():
        if name in data:
            v = data[name]
            if _is_int(v) and lo <= v <= hi:
                out[name] = v
            else:
                errors.append(f"{name}: must be an integer in [{lo}, {hi}], got {shown(v)}")
    for name, (lo, hi) in {"strength": (0, 1), "guidance": (0, MAX_GUIDANCE)}.items():
        if name in data:
            v = data[name]
            if _is_number(v) and lo <= v <= hi:
                out[name] = float(v)
            else:
                errors.append(f"{name}: must be a number in [{lo}, {hi}], got {shown(v)}")
    return out


def _pictures(data: dict, errors: list[str]) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """"image" and "mask" -> (file bytes, size), from whichever form the request used."""
    raw = {}
    if "image" in data and "image_b64" in data:
        errors.append("image, image_b64: give one of them, not both")
    elif "image" in data:
        raw["image"] = _image_bytes(data["image"], "image", errors), "image"
    elif "image_b64" in data:
        raw["image"] = _b64_bytes(data["image_b64"], errors), "image_b64"
    if "mask" in data:
        raw["mask"] = _image_bytes(data["mask"], "mask", errors), "mask"
    out = {}
    for key, (data_bytes, name) in raw.items():
        if data_bytes is not None:
            try:
                out[key] = data_bytes, image_size(data_bytes, name)
            except RequestError as e:
                errors.extend(e.messages)
    return out


def to_job(model: str, body: bytes, content_type: str = "application/json") -> GenerationJob:
    """Request body -> the job (fields left out are left out, so the model's defaults apply).
    Raises RequestError(400) listing every violation."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, f"body: must be a JSON object, got {shown(data)}")
    errors: list[str] = []
    kwargs = _fields(data, errors)
    pictures = _pictures(data, errors)
    if errors:
        raise RequestError(400, errors)
    kwargs.update({key: data_bytes for key, (data_bytes, _) in pictures.items()})
    if "image" in pictures:
        kwargs.update(_fitted_sides(pictures["image"][1], kwargs.get("width"), kwargs.get("height")))
    else:
        kwargs.pop("strength", None)  # Workers AI ignores strength without an image; so do we
    return GenerationJob(model, kwargs)


def _fitted_sides(size: tuple[int, int], width: int | None, height: int | None) -> dict:
    """The sides the request left out, from the image: its own rounded down to a multiple of 8
    (what the pipeline would take), scaled down first when a side passes the schema's 2048.
    Written out so that the size is known before the job runs (for its time estimate and log);
    a side under 8 is left to the pipeline's own error."""
    scale = min(1.0, MAX_SIDE / max(size))
    w, h = (int(v * scale) // 8 * 8 if scale == 1 else max(8, int(v * scale) // 8 * 8) for v in size)
    return {name: value for name, given, value in (("width", width, w), ("height", height, h))
            if given is None and value >= 8}


# ---------------------------------------------------------------- model search


TASK = {"id": "text-to-image", "name": "Text-to-Image",
        "description": "Generates an image from a text prompt (and, for some models, an input image and mask)."}
SOURCE = 1                  # every model here comes from one source: this server's registry
SEARCH_PARAMS = ("search", "task", "author", "source", "hide_experimental", "page", "per_page")
PER_PAGE = 50


def search_reply(catalogue: list[tuple[ModelSpec, bool]], params: dict[str, str]) -> Reply:
    """GET /ai/models/search, as Cloudflare's: `search` (in the name or description), `task`
    (its name or id), `author` (the id's second part), `source`, `hide_experimental`, `page`,
    `per_page`. Entries carry Cloudflare's fields plus the mode, default size and steps and
    whether the weights are here; never a server path."""
    unknown = sorted(set(params) - set(SEARCH_PARAMS))
    if unknown:
        raise RequestError(400, f"{', '.join(unknown)}: not a parameter of the model search "
                                f"(allowed: {', '.join(SEARCH_PARAMS)})")
    page, per_page = (_positive(params, name, default) for name, default in (("page", 1), ("per_page", PER_PAGE)))
    source = params.get("source")
    if source is not None and not _is_number_text(source):
        raise RequestError(400, f"source: must be a number, got {shown(source)}")
    if params.get("hide_experimental", "false").lower() not in ("true", "false"):
        raise RequestError(400, f"hide_experimental: must be true or false, got {shown(params['hide_experimental'])}")
    text, task, author = (params.get(k, "").lower() for k in ("search", "task", "author"))
    found = [entry(spec, present) for spec, present in catalogue
             if text in spec.id.lower() + "\n" + spec.description.lower()
             and (not task or task in (TASK["name"].lower(), TASK["id"]))
             and (not author or author == spec.id.split("/")[1].lower())
             and (source is None or float(source) == SOURCE)]  # none of ours is experimental
    shown_page = found[(page - 1) * per_page:page * per_page]
    return Reply(200, _json({"success": True, "errors": [], "messages": [], "result": shown_page,
                             "result_info": {"page": page, "per_page": per_page, "count": len(shown_page),
                                             "total_count": len(found)}}), JSON)


def entry(spec: ModelSpec, present: bool) -> dict:
    d = spec.defaults
    return {"id": spec.id, "source": SOURCE, "name": spec.id, "description": spec.description, "task": TASK,
            "tags": [], "properties": [], "mode": spec.mode, "width": d["width"], "height": d["height"],
            "num_steps": d["num_steps"], "present": present}


def _positive(params: dict, name: str, default: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= 10 ** 6:
        raise RequestError(400, f"{name}: must be an integer in [1, 1000000], got {shown(text)}")
    return int(text)


def _is_number_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
