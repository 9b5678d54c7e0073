"""`sd serve`: the Workers AI text-to-image REST API, self-hosted.

    POST /ai/run/{model}                                  JSON input -> 200 image/png
    POST /client/v4/accounts/{account_id}/ai/run/{model}  the same, where Cloudflare's clients send it
    GET  /ai/models/search (and under /client/v4/accounts/{account_id}/)   the registry
    GET  /healthz                                          liveness, queue length, loaded models

The model id keeps its slashes (`/ai/run/@cf/lykon/dreamshaper-8-lcm`) or comes percent-encoded
(`@cf%2Flykon%2F...`, as the official `cloudflare` clients send it); both reach the same model.

Input checking and the error envelope live in sd/api.py (see there for the schema, the
status codes and the envelope's error codes).

One worker thread runs the generations, one at a time, in front of a bounded queue; the event
loop only parses, validates and waits. A client that disconnects or times out loses its place
(or stops its running job at the next sampler step). SIGTERM / Ctrl-C: queued requests are
answered 503, the running one finishes, then the process exits 0.
"""

import argparse
import asyncio
import collections
import contextlib
import hmac
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .api import CODES, NO_ROUTE, RequestError, envelope, parse_input, shown
from .models import REGISTRY, Models, Registry, UnknownModel, WeightsMissing, default_weights_dir, parse_overrides
from .weights import CheckpointError

log = logging.getLogger("sd.server")

DEFAULT_QUEUE_SIZE = 32
DEFAULT_MAX_BODY_MB = 20
DEFAULT_TIMEOUT = 300.0
PER_PAGE = 50               # /ai/models/search
MISSING_EXTRA = "sd serve needs the server extra: pip install 'sd[server]'"
class Cancelled(Exception):
    """Raised inside the worker between sampler steps when the request gave up (timeout, disconnect)."""


# ---------------------------------------------------------------- the queue and its worker


class Job:
    __slots__ = ("model", "inputs", "future", "cancelled")

    def __init__(self, model: str, inputs: dict, future: asyncio.Future):
        self.model, self.inputs, self.future, self.cancelled = model, inputs, future, False


class Worker:
    """A bounded queue in front of one thread that runs Models.generate, one job at a time.
    Queue bookkeeping happens on the event loop only; the thread just generates."""

    def __init__(self, models, queue_size: int):
        self.models, self.queue_size = models, queue_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.closing: str | None = None
        self.loaded: tuple[str, ...] = ()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self):
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-worker")
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self):
        self.close("the server is shutting down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def full(self) -> bool:
        return len(self.waiting) + (self.running is not None) > self.queue_size

    def check_open(self):
        if self.closing:
            raise RequestError(503, f"{self.closing}; try again later")
        if self.full():
            raise RequestError(429, f"the queue is full ({self.queue_size} waiting behind the one running); "
                                    "try again later", headers={"Retry-After": "1"})

    def submit(self, model: str, inputs: dict) -> Job:
        self.check_open()
        if self._wakeup is None:
            raise RuntimeError("the worker is not started (run the app with its lifespan)")
        job = Job(model, inputs, asyncio.get_running_loop().create_future())
        self.waiting.append(job)
        self._wakeup.set()
        return job

    def cancel(self, job: Job):
        job.cancelled = True
        with contextlib.suppress(ValueError):
            self.waiting.remove(job)

    def close(self, reason: str):
        """Answer every waiting job with 503 and take no new ones; the running job finishes."""
        self.closing = reason
        while self.waiting:
            job = self.waiting.popleft()
            if not job.future.done():
                job.future.set_exception(RequestError(503, f"{reason}; try again later"))

    async def _consume(self):
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if not self.waiting:
                self._wakeup.clear()
                continue
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            self.running = job
            try:
                png = await loop.run_in_executor(self._executor, self._generate, job)
            except asyncio.CancelledError:
                if not job.future.done():
                    job.future.set_exception(RequestError(503, "the server is shutting down"))
                raise
            except Exception as e:  # handed to the request; never ends the loop
                if not job.future.done() and not job.cancelled:
                    job.future.set_exception(e)
            else:
                if not job.future.done() and not job.cancelled:
                    job.future.set_result(png)
            finally:
                self.running = None

    def _generate(self, job: Job) -> bytes:
        """In the worker thread."""
        def stop_if_cancelled(step):
            if job.cancelled:
                raise Cancelled()

        if job.cancelled:
            raise Cancelled()
        try:
            image = self.models.generate(job.model, callback=stop_if_cancelled, **job.inputs)
        finally:
            self.loaded = tuple(getattr(self.models, "cache", ()))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()


# ---------------------------------------------------------------- the app


class RequestLog:
    """One line per request on the `sd.server` logger: client, method, path, model, status, seconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), []

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            path = json.dumps(scope.get("path", ""))[1:-1]  # no control characters into the log
            log.info("%s %s %s %s %s %.3fs", client[0], scope.get("method"), path, scope.get("sd.model", "-"),
                     scope.get("sd.status") or (status[0] if status else "-"), time.perf_counter() - start)


async def _read_body(request, max_body: int) -> bytes:
    """The body, at most `max_body` bytes: an oversize one is refused by its Content-Length before
    a byte is read, or as soon as the streamed bytes pass the limit. uvicorn reads and drops the
    rest of the body while the client sends it, so the client then reads the 413; a Content-Length
    over twice the limit (which may never arrive) closes the connection instead."""
    from starlette.requests import ClientDisconnect
    too_big = RequestError(413, f"body: larger than the server's limit of {max_body} bytes")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, f"content-length: not a number: {shown(length)}")
        if int(length) > max_body:
            if int(length) > 2 * max_body:
                too_big.headers["Connection"] = "close"
            raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(499, "client disconnected") from None
    return b"".join(chunks)


async def _wait_for_disconnect(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(models, *, api_token: str | None = None, queue_size: int = DEFAULT_QUEUE_SIZE,
               max_body: int = DEFAULT_MAX_BODY_MB * 2 ** 20, timeout: float | None = DEFAULT_TIMEOUT):
    """The ASGI app around a `Models` (or anything with `.generate(model_id, prompt, **fields)` and a
    `.registry`). `timeout`: seconds a request may wait plus run (None or 0: no limit)."""
    try:
        import anyio
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise RuntimeError(MISSING_EXTRA) from None

    worker = Worker(models, queue_size)
    parse_limiter = anyio.CapacityLimiter(2)  # big bodies are parsed off the event loop, two at a time
    timeout = timeout or None

    def error(e: RequestError):
        return JSONResponse(envelope(e.messages, e.code), status_code=e.status, headers=e.headers)

    def authorize(request):
        if api_token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if not value:
            raise RequestError(401, "authorization: missing; send Authorization: Bearer <API token>",
                               headers={"WWW-Authenticate": "Bearer"})
        # Starlette decodes headers as latin-1: .encode("latin-1") gives back the bytes the client sent
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("latin-1"),
                                                                 api_token.encode("utf-8")):
            raise RequestError(401, "authorization: wrong API token", headers={"WWW-Authenticate": "Bearer"})

    async def run(request):
        model = request.path_params["model"]
        request.scope["sd.model"] = model
        try:
            authorize(request)
            if model not in REGISTRY:
                raise RequestError(404, str(UnknownModel(model)))
            worker.check_open()  # before reading a body we would have to refuse anyway
            body = await _read_body(request, max_body)
            if len(body) > 2 ** 16:
                inputs = await anyio.to_thread.run_sync(parse_input, body, limiter=parse_limiter)
            else:
                inputs = parse_input(body)
            if models.registry.missing(model):
                raise RequestError(503, models.registry.missing_message(model))
            job = worker.submit(model, inputs)
            png = await _wait(request, job)
            return Response(png, media_type="image/png")
        except RequestError as e:
            if e.status == 499:  # nobody reads this answer; the log says why
                request.scope["sd.status"] = "499 (client gone)"
            return error(e)
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("request %s: %s %s failed", ref, request.method, model)
            return error(RequestError(500, f"internal error (see the server log, request {ref})"))

    async def _wait(request, job: Job) -> bytes:
        gone = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({job.future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            worker.cancel(job)
            if gone in done:
                raise RequestError(499, "client disconnected")
            raise RequestError(504, f"timed out after {timeout:g} s (waiting for the worker and running)")
        try:
            return job.future.result()
        except RequestError:
            raise
        except Cancelled:
            raise RequestError(504, "timed out") from None
        except UnknownModel as e:
            raise RequestError(404, str(e)) from None
        except WeightsMissing as e:
            raise RequestError(503, str(e)) from None
        except (CheckpointError, FileNotFoundError):
            ref = _log_failure(request, job)
            raise RequestError(500, f"{job.model}: the model's weights could not be loaded "
                                    f"(see the server log, request {ref})") from None
        except ValueError as e:  # the pipeline's input checks: "field: rule, got ..."
            raise RequestError(400, str(e)) from None
        except Exception:
            ref = _log_failure(request, job)
            raise RequestError(500, f"internal error (see the server log, request {ref})") from None

    def _log_failure(request, job) -> str:
        ref = uuid.uuid4().hex[:12]
        log.exception("request %s: %s %s failed", ref, request.method, job.model)
        return ref

    async def search(request):
        try:
            authorize(request)
            page, per_page = (_query_int(request, name, default) for name, default in (("page", 1),
                                                                                      ("per_page", PER_PAGE)))
        except RequestError as e:
            return error(e)
        models_list = models.registry.describe()
        result = models_list[(page - 1) * per_page:page * per_page]
        return JSONResponse({"success": True, "errors": [], "messages": [], "result": result,
                             "result_info": {"page": page, "per_page": per_page, "count": len(result),
                                             "total_count": len(models_list)}})

    async def health(request):
        running = worker.running
        return JSONResponse({"ok": True, "queue": len(worker.waiting), "queue_size": queue_size,
                             "running": running.model if running else None, "loaded": list(worker.loaded),
                             "device": str(getattr(models, "device", "")), "closing": worker.closing is not None})

    async def http_error(request, exc: HTTPException):
        code = NO_ROUTE if exc.status_code == 404 else CODES.get(exc.status_code, 5000 + exc.status_code)
        message = {404: f"no route for {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed here"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(envelope([message], code), status_code=exc.status_code, headers=exc.headers)

    async def server_error(request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("request %s: unhandled error", ref, exc_info=exc)
        return JSONResponse(envelope([f"internal error (see the server log, request {ref})"], CODES[500]),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await worker.stop()

    routes = [Route("/ai/run/{model:path}", run, methods=["POST"]),
              Route("/client/v4/accounts/{account_id}/ai/run/{model:path}", run, methods=["POST"]),
              Route("/ai/models/search", search, methods=["GET"]),
              Route("/client/v4/accounts/{account_id}/ai/models/search", search, methods=["GET"]),
              Route("/healthz", health, methods=["GET"])]
    app = Starlette(routes=routes, middleware=[Middleware(RequestLog)], lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.router.redirect_slashes = False  # an API answers 404, not a redirect, for /ai/run/
    app.state.worker = worker
    return app


def _query_int(request, name: str, default: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= 10 ** 6:
        raise RequestError(400, f"{name}: must be an integer in [1, 1000000], got {shown(text)}")
    return int(text)


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd serve", description="Serve the Workers AI text-to-image API.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--weights-dir", default=None, help="where `sd download` puts the models "
                                                       "(default: $SD_WEIGHTS_DIR, else ./weights)")
    p.add_argument("--model", action="append", default=[], metavar="ID=SOURCE",
                   help="serve model ID from SOURCE (a .safetensors file or a diffusers folder); repeatable")
    p.add_argument("--api-token", default=None, help="require `Authorization: Bearer TOKEN` "
                                                     "(default: $SD_API_TOKEN; none: no authentication)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 elsewhere")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help=f"requests that may wait behind the running one; more get 429 (default {DEFAULT_QUEUE_SIZE})")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                   help=f"largest request body in MiB; larger get 413 (default {DEFAULT_MAX_BODY_MB})")
    p.add_argument("--cache-gb", type=float, default=None,
                   help="memory for loaded models in GiB, least recently used out first "
                        "(default: 80%% of the GPU's memory, or of RAM)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds a request may wait plus run before a 504; 0: no limit (default {DEFAULT_TIMEOUT:g})")
    return p


def _server_class():
    import uvicorn
    from uvicorn import server as uvicorn_server

    class Server(uvicorn.Server):
        """uvicorn's server, but: queued requests are answered 503 as shutdown starts (the running one
        finishes), and a SIGTERM is not re-raised after the graceful shutdown, so the exit status is 0."""

        def __init__(self, config, worker):
            super().__init__(config)
            self.worker = worker

        async def shutdown(self, sockets=None):
            self.worker.close("the server is shutting down")
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = getattr(uvicorn_server, "HANDLED_SIGNALS", (signal.SIGINT, signal.SIGTERM))
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        return 2
    for name, value, low in (("--queue-size", args.queue_size, 0), ("--max-body-mb", args.max_body_mb, 1e-6),
                             ("--timeout", args.timeout, 0), ("--port", args.port, 0)):
        if value < low:
            print(f"error: {name}: must be at least {low:g}, got {value:g}", file=sys.stderr)
            return 2
    try:
        overrides = parse_overrides(args.model)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    if args.device:
        try:
            torch.device(args.device)
        except RuntimeError as e:
            print(f"error: --device: {e}", file=sys.stderr)
            return 2
    registry = Registry(Path(args.weights_dir) if args.weights_dir else default_weights_dir(), overrides)
    max_bytes = int(args.cache_gb * 2 ** 30) if args.cache_gb is not None else None
    models = Models(registry, device=args.device, dtype=dtype, max_bytes=max_bytes)
    if args.api_token is not None and not args.api_token.strip():
        print("error: --api-token: empty (leave it out to serve without authentication)", file=sys.stderr)
        return 2
    token = args.api_token if args.api_token is not None else os.environ.get("SD_API_TOKEN") or None

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for entry in registry.describe():
        log.info("%s", f"{entry['name']}: ready ({entry['source']})" if entry["present"]
                 else registry.missing_message(entry["name"]))
    log.info("device %s, queue %d, body limit %g MiB, timeout %s, %s", models.device, args.queue_size,
             args.max_body_mb, f"{args.timeout:g} s" if args.timeout else "none",
             "API token required" if token else "no authentication")

    app = create_app(models, api_token=token, queue_size=args.queue_size, max_body=int(args.max_body_mb * 2 ** 20),
                     timeout=args.timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="info",
                            lifespan="on", server_header=False)
    server = _server_class()(config, app.state.worker)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        return e.code if isinstance(e.code, int) else 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
