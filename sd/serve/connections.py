"""Slow and numerous clients: a deadline for each request's headers, a deadline for its body, and
a cap on open connections, so that clients trickling bytes cannot hold the server's sockets.

uvicorn times out idle keep-alive connections only; a connection still sending its headers, or
its body, is kept for as long as bytes trickle in. So:
- headers: GuardedProtocol wraps uvicorn's h11 protocol (passed as `uvicorn.Config(http=...)`)
  and closes a connection, with a 408, whose request headers are not all in within the deadline
  of its opening or of its previous response. The app tells it when a request's headers are
  complete (its handler runs) and when its response is sent, by the client address, which
  uvicorn reports as the connection's peer address when `proxy_headers` is off.
- bodies: `read_body` (in the app) gives a body the deadline plus its size at MIN_BODY_RATE.
- the cap: a connection beyond `max_connections` open ones is answered 503 and closed at once.
"""

import asyncio
import functools

from .jobs import RequestError

MIN_BODY_RATE = 64 * 1024   # bytes per second that a body may take on top of the deadline


def _canned(status: str, text: str, extra: str = "") -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


class ConnectionGuard:
    """The limits, and the open connections by client address."""

    def __init__(self, read_timeout: float, max_connections: int):
        self.read_timeout, self.max_connections = read_timeout, max_connections
        self.open: dict[tuple[str, int], "GuardedProtocol"] = {}
        self.too_slow = _canned("408 Request Timeout", f"request headers: not received within {read_timeout:g} s")
        self.too_many = _canned("503 Service Unavailable", f"too many open connections (at most {max_connections})",
                                "Retry-After: 1\r\n")

    def protocol(self):
        """What uvicorn.Config(http=...) takes: it calls it with the h11 protocol's arguments."""
        return functools.partial(GuardedProtocol, self)

    def request_started(self, client):
        if (connection := self.open.get(_key(client))) is not None:
            connection.disarm()

    def response_sent(self, client):
        if (connection := self.open.get(_key(client))) is not None:
            connection.arm()


def _key(address) -> tuple[str, int] | None:
    if isinstance(address, (list, tuple)) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class GuardedProtocol(asyncio.Protocol):
    """uvicorn's h11 protocol with the header deadline and the connection cap around it: every
    asyncio.Protocol call is passed on; the guard only adds a timer and the refusals."""

    def __init__(self, guard: ConnectionGuard, **uvicorn_arguments):
        from uvicorn.protocols.http.h11_impl import H11Protocol  # the class `uvicorn --http h11` runs
        self.guard, self.inner = guard, H11Protocol(**uvicorn_arguments)
        self.transport, self.key, self.timer = None, None, None

    def connection_made(self, transport):
        self.transport, self.key = transport, _key(transport.get_extra_info("peername"))
        if len(self.guard.open) >= self.guard.max_connections:
            transport.write(self.guard.too_many)
            transport.close()
            self.inner = None
            return
        if self.key is not None:
            self.guard.open[self.key] = self
            self.arm()
        self.inner.connection_made(transport)

    def arm(self):
        self.disarm()
        self.timer = asyncio.get_running_loop().call_later(self.guard.read_timeout, self._headers_too_slow)

    def disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _headers_too_slow(self):
        self.timer = None
        if not self.transport.is_closing():
            self.transport.write(self.guard.too_slow)
            self.transport.close()

    def connection_lost(self, exc):
        self.disarm()
        if self.key is not None and self.guard.open.get(self.key) is self:
            del self.guard.open[self.key]
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def data_received(self, data):
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self):
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self):
        if self.inner is not None:
            self.inner.resume_writing()


async def read_body(receive, content_length: str | None, max_body: int, read_timeout: float) -> bytes:
    """The request body, at most `max_body` bytes, within `read_timeout` plus its size at
    MIN_BODY_RATE. An oversize body is refused by its Content-Length before a byte is read, or as
    soon as the streamed bytes pass the limit; uvicorn reads and drops the rest while the client
    sends it, so the client then reads the 413 (a Content-Length over twice the limit, which may
    never arrive, closes the connection instead). A body too slow is a 408 and a close."""
    too_big = RequestError(413, f"body: larger than the server's limit of {max_body} bytes")
    if content_length is not None:
        if not content_length.isdigit():
            raise RequestError(400, f"content-length: not a number: {content_length[:40]!r}")
        if int(content_length) > max_body:
            if int(content_length) > 2 * max_body:
                too_big.headers["Connection"] = "close"
            raise too_big
    loop = asyncio.get_running_loop()
    deadline = loop.time() + read_timeout
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline + size / MIN_BODY_RATE - loop.time()))
        except asyncio.TimeoutError:
            raise RequestError(408, f"body: {size} bytes arrived in {read_timeout:g} s plus 1 s per "
                                    f"{MIN_BODY_RATE // 1024} KiB; send it faster", {"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise RequestError(499, "client disconnected")
        size += len(message.get("body", b""))
        if size > max_body:
            raise too_big
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
