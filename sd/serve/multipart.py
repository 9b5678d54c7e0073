"""multipart/form-data bodies (RFC 7578 on RFC 2046's multipart syntax), read whole: how the
OpenAI Images API's edits send their picture, mask and fields. Strict: whatever is malformed is
a RequestError(400) saying what, never a guess at what the client meant.
"""

import re
from dataclasses import dataclass

from .jobs import RequestError

MAX_PARTS = 64
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
PARAM = re.compile(rf'\s*;\s*({TOKEN})\s*=\s*("(?:[^"\\\r\n]|\\.)*"|{TOKEN})\s*')


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None     # present (maybe empty) for a file, None for a plain field
    content_type: str | None
    data: bytes


def header_value(value: str, what: str) -> tuple[str, dict[str, str]]:
    """`type; key=value; key="quoted"` -> ("type", {key: value}), keys lowercased."""
    kind, semicolon, rest = value.partition(";")
    rest, params, end = semicolon + rest, {}, 0
    for match in PARAM.finditer(rest):
        if match.start() != end:
            break
        key, raw = match.group(1).lower(), match.group(2)
        if key in params:
            raise RequestError(400, f"body: {what} names {key} twice")
        params[key] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        end = match.end()
    if end != len(rest):
        raise RequestError(400, f"body: {what} is not `type; name=value; ...`: {rest[end:][:40]!r}")
    return kind.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    kind, params = header_value(content_type, "Content-Type")
    if kind != "multipart/form-data":
        raise RequestError(400, f"Content-Type: must be multipart/form-data, got {content_type[:60]!r}")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise RequestError(400, "Content-Type: its boundary must be 1 to 70 ASCII characters (RFC 2046), got "
                                f"{boundary[:80]!r}")
    return boundary.encode("ascii")


def parse(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart/form-data body, in order."""
    delimiter = b"--" + boundary_of(content_type)
    # Each delimiter but a first at the very start follows a CRLF; what precedes the first (a
    # preamble) and follows the closing one (an epilogue) is ignored (RFC 2046).
    body = b"\r\n" + body
    first = body.find(b"\r\n" + delimiter)
    if first < 0:
        raise RequestError(400, "body: no part begins with the boundary the Content-Type names")
    parts = []
    for chunk in body[first + 2 + len(delimiter):].split(b"\r\n" + delimiter):
        if chunk.startswith(b"--"):
            return parts
        chunk = chunk.lstrip(b" \t")  # a delimiter line may end in spaces (transport padding)
        if not chunk.startswith(b"\r\n"):
            raise RequestError(400, "body: a boundary line must end with CRLF (or -- after the last part)")
        if len(parts) == MAX_PARTS:
            raise RequestError(400, f"body: more than {MAX_PARTS} parts")
        parts.append(_part(chunk[2:], len(parts) + 1))
    raise RequestError(400, "body: ends before the closing boundary (--boundary--)")


def _part(raw: bytes, number: int) -> Part:
    where = f"body: part {number}"
    if raw.startswith(b"\r\n"):  # no headers at all
        head, data = b"", raw[2:]
    else:
        head, sep, data = raw.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(400, f"{where}: its headers do not end with an empty line")
    try:
        lines = head.decode("utf-8").split("\r\n") if head else []
    except UnicodeDecodeError:
        raise RequestError(400, f"{where}: its headers are not UTF-8") from None
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not re.fullmatch(TOKEN, name):
            raise RequestError(400, f"{where}: {line[:40]!r} is not a `Name: value` header")
        if name.lower() in headers:
            raise RequestError(400, f"{where}: header {name} given twice")
        headers[name.lower()] = value.strip()
    if "content-disposition" not in headers:
        raise RequestError(400, f"{where}: no Content-Disposition header")
    kind, params = header_value(headers["content-disposition"], f"part {number}'s Content-Disposition")
    if kind != "form-data" or not params.get("name"):
        raise RequestError(400, f"{where}: Content-Disposition must be form-data with a name")
    return Part(params["name"], params.get("filename"), headers.get("content-type"), data)
