"""The Workers AI text-to-image API's input schema, checked strictly, and its error envelope.

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
from the registry (sd/models.py). Images are at most 8192 x 8192 pixels.

Errors come as Cloudflare's envelope `{"success": false, "errors": [{"code": N, "message": "..."}],
"messages": [], "result": null}`; every schema violation is listed, each naming the field and rule.

    status  code   when
    400     5006   the body is not a JSON object, a field breaks the schema, or the pipeline refuses
                   the input (e.g. width not a multiple of 8, inpainting without a mask)
    401     10000  a token is configured (--api-token / SD_API_TOKEN) and `Authorization: Bearer`
                   does not carry it
    404     5007   no such model;  7000: no such route
    405     7001   wrong method
    413     5413   body over --max-body-mb (Content-Length checked up front, streamed bytes counted)
    429     3040   the queue is full (--queue-size requests wait behind the one running)
    500     5500   anything else, e.g. a weights file that is not safetensors; the message is generic
                   with a request id, the traceback goes to the server log
    503     5503   the model's weights are not on disk (the message says which `sd download` fetches
                   them) or the server is shutting down
    504     5504   --timeout seconds passed (waiting plus running); a running job stops at its next step

5006, 5007, 3040, 7000, 7001 and 10000 are the codes Cloudflare's API uses for these cases; the
others are 5000 + the status.
"""

import base64
import binascii
import io
import json
import math

MIN_SIDE, MAX_SIDE = 256, 2048
MAX_STEPS = 20
MAX_GUIDANCE = 100
MAX_SEED = 2 ** 64 - 1
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_DIGITS = 100            # a longer JSON number is an error, not a big-integer parse
# HTTP status -> the envelope's error code (Cloudflare's own where it has one).
CODES = {400: 5006, 401: 10000, 404: 5007, 405: 7001, 413: 5413, 429: 3040, 500: 5500, 503: 5503, 504: 5504}
NO_ROUTE = 7000
FIELDS = ("prompt", "negative_prompt", "height", "width", "image", "image_b64", "mask", "num_steps", "strength",
          "guidance", "seed")
class RequestError(Exception):
    """An answer other than 200: status, one or more messages, extra headers."""

    def __init__(self, status: int, messages, headers: dict | None = None):
        super().__init__(messages)
        self.status, self.headers, self.code = status, headers or {}, CODES.get(status, 5000 + status)
        self.messages = [messages] if isinstance(messages, str) else list(messages)
def envelope(messages: list[str], code: int) -> dict:
    return {"success": False, "errors": [{"code": code, "message": m} for m in messages], "messages": [],
            "result": None}


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
    except _BadNumber as e:
        raise RequestError(400, f"body: not valid JSON: {e}") from None
    except ValueError as e:  # JSONDecodeError
        raise RequestError(400, f"body: not valid JSON: {e}") from None


def _image_bytes(data: dict, name: str, errors: list[str]) -> bytes | None:
    value = data[name]
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
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        errors.append(f"image_b64: not valid base64 ({e})")
        return None
    if not data:
        errors.append("image_b64: decodes to no bytes")
        return None
    return data


def check_image(data: bytes, name: str) -> None:
    """Decode the picture once here, so that anything wrong with it is the client's 400 and not a
    failure in the worker; the worker decodes it again (the bytes are smaller to keep in the queue)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise RequestError(400, f"{name}: must have at most {MAX_IMAGE_PIXELS} pixels (8192 x 8192), "
                                        f"got {width}x{height}")
            image.load()
    except RequestError:
        raise
    except Exception as e:  # PIL raises many kinds on broken files; all mean the same to the client
        kind = "image too large" if "decompression bomb" in str(e).lower() else type(e).__name__
        raise RequestError(400, f"{name}: not a readable image (PNG, JPEG or WebP expected; {kind})") from None


def _text_ok(name: str, text: str, errors: list[str]) -> bool:
    try:
        text.encode("utf-8")  # JSON may escape a lone surrogate ("\\ud800"), which no tokenizer takes
    except UnicodeEncodeError as e:
        errors.append(f"{name}: must be valid Unicode text, got a lone surrogate at index {e.start}")
        return False
    return True


def parse_input(body: bytes) -> dict:
    """Request body -> keyword arguments for Models.generate (fields left out are left out, so
    the model's defaults apply). Raises RequestError(400) listing every violation."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, f"body: must be a JSON object, got {shown(data)}")
    errors, out = [], {}
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
    images = {}
    if "image" in data and "image_b64" in data:
        errors.append("image, image_b64: give one of them, not both")
    elif "image" in data:
        images["image"] = _image_bytes(data, "image", errors)
    elif "image_b64" in data:
        images["image_b64"] = _b64_bytes(data["image_b64"], errors)
    if "mask" in data:
        images["mask"] = _image_bytes(data, "mask", errors)
    for name, raw in images.items():
        if raw is not None:
            try:
                check_image(raw, name)
            except RequestError as e:
                errors.extend(e.messages)
                continue
            out["mask" if name == "mask" else "image"] = raw
    if errors:
        raise RequestError(400, errors)
    if "image" not in out:
        out.pop("strength", None)  # Workers AI ignores strength without an image; so do we
    return out
