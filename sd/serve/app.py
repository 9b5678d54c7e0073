"""The Starlette app: the routes table, module-level handlers, the table from exception type to
status, and the access log.

    POST /ai/run/{model}                                  Workers AI JSON -> 200 image/png
    POST /client/v4/accounts/{account_id}/ai/run/{model}  the same, where Cloudflare's clients send it
    GET  /ai/models/search (and under /client/v4/accounts/{account_id}/)   the catalogue, as Cloudflare's
    GET  /healthz                                          200 when every configured model can load, else 503

The model id keeps its slashes (`/ai/run/@cf/lykon/dreamshaper-8-lcm`) or comes percent-encoded
(`@cf%2Flykon%2F...`, as the official `cloudflare` clients send it); both reach the same model.

Every generation takes one path, whatever its dialect: authorize, read the body (within the
deadline), translate it (the dialect's `to_job`), check the job (model, inputs, weights, time),
queue it, wait for it or for the client to leave or the timeout (either stops the job), and
translate the result or the error back (the dialect's replies).
"""

import asyncio
import base64
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field

from ..errors import InputError
from ..registry import REGISTRY, UnknownModel, WeightsMissing, spec_of
from . import a1111
from . import openai, workers_ai
from . import native, playground
from .cache import LoadFailed, ModelCache, SourceProblem
from .connections import ConnectionGuard, read_body
from .image_files import ImageFiles
from .jobs import GenerationJob, GenerationResult, Reply, RequestError
from .speed import Speeds, TooSlow
from .router import Workers
from .worker import Ticket, Worker

log = logging.getLogger("sd.serve")

# What a request that fails with each exception is answered; a RequestError carries its own
# status. Anything else is a bug: 500, a generic message, the traceback in the log.
ERROR_STATUS: dict[type, int] = {
    InputError: 400,        # the core's own checks of a request ("width: must be a multiple of 8, got 260")
    UnknownModel: 404,
    TooSlow: 422,
    LoadFailed: 500,        # weights that looked right but did not load: the message names the model
    WeightsMissing: 503,
    SourceProblem: 503,
}
PARSE_OFF_LOOP = 2 ** 16    # bodies larger than this are parsed in a thread, not on the event loop


@dataclass
class Service:
    """What the handlers share: the model cache, the worker and its limits. With several devices
    `worker` is a Workers (sd/serve/router.py) and `cache` the first device's (the cheap checks and
    the defaults are the same on every device)."""
    cache: ModelCache
    worker: Worker | Workers
    speeds: Speeds
    api_token: str | None = None
    max_body: int = 20 * 2 ** 20
    read_timeout: float = 30.0
    prompt_style: str | None = None           # --prompt-style: for jobs whose dialect leaves it to the server
    guard: ConnectionGuard | None = None      # set when running under uvicorn with GuardedProtocol
    image_files: ImageFiles = field(default_factory=ImageFiles)  # pictures answered as URLs (OpenAI's dialect)
    parsing: object = field(default=None, repr=False)  # an anyio CapacityLimiter, made on startup
    metrics: object = field(default=None, repr=False)  # sd/serve/metrics.py's Metrics, made with the app
    jobs: object = field(default=None, repr=False)     # jobs clients follow (sd/serve/progress.py), made on first use

    @property
    def timeout(self) -> float | None:
        """Seconds a request may wait plus run (None: no limit); the time model refuses by it too."""
        return self.speeds.timeout


# ---------------------------------------------------------------- errors


def status_of(e: Exception) -> int:
    if isinstance(e, RequestError):
        return e.status
    return next((ERROR_STATUS[cls] for cls in type(e).__mro__ if cls in ERROR_STATUS), 500)


def answer(e: Exception, ref: str, model: str = "-") -> tuple[int, list[str], dict]:
    """(status, messages, headers) for a request that failed with `e`; what a client must not
    see (server paths, tracebacks) goes to the log under the request's id."""
    status = status_of(e)
    if isinstance(e, RequestError):
        return status, e.messages, e.headers
    if isinstance(e, SourceProblem):
        log.warning("request %s: %s", ref, e)
        return status, [f"{e.model}: its weights are not a checkpoint sd can read (see the server log, "
                        f"request {ref})"], {}
    if status == 500:
        log.error("request %s: %s failed", ref, clean(model), exc_info=e)
        what = str(e) if isinstance(e, LoadFailed) else "internal error"
        return status, [f"{what} (see the server log, request {ref})"], {}
    return status, [str(e)], {}


def respond(reply: Reply):
    from starlette.responses import Response
    return Response(reply.body, status_code=reply.status, headers=reply.headers, media_type=reply.media_type)


# ---------------------------------------------------------------- the handlers


async def workers_ai_run(request):
    return respond(await generation(request, workers_ai, request.path_params["model"]))


async def generation(request, dialect, model: str | None) -> Reply:
    """One generation request, from any dialect: the dialect's `to_job(model, body, content_type)`
    reads its body into a GenerationJob (`model` None: the dialect finds it in the body), its
    `image_reply(result)` and `error_reply(status, messages, headers)` answer in its shapes."""
    service: Service = request.app.state.service
    note = request.scope["sd.log"]
    note["model"] = model or "-"
    try:
        authorize(request, service.api_token, getattr(dialect, "basic_auth", False))
        if model is not None:
            spec_of(model)
        service.worker.check_open()  # before reading a body we would have to refuse anyway
        body = await read_body(request.receive, request.headers.get("content-length"), service.max_body,
                               service.read_timeout)
        content_type = request.headers.get("content-type", "")
        if len(body) > PARSE_OFF_LOOP:
            import anyio
            job = await anyio.to_thread.run_sync(dialect.to_job, model, body, content_type, limiter=service.parsing)
        else:
            job = dialect.to_job(model, body, content_type)
        if service.prompt_style and "prompt_style" not in job.kwargs:  # a dialect may fix it (A1111's does)
            job = GenerationJob(job.model, {**job.kwargs, "prompt_style": service.prompt_style})
        note["model"], note["job"] = job.model, job
        spec_of(job.model)
        service.cache.check(job)
        service.speeds.check(job, service.cache.defaults(job.model))
        result = await outcome(request, service, service.worker.submit(job, note["id"]))
        note["settings"] = result.settings
        import anyio  # a dialect may re-encode and base64 many pictures: off the event loop
        return await anyio.to_thread.run_sync(dialect.image_reply, result, limiter=service.parsing)
    except Exception as e:
        status, messages, headers = answer(e, note["id"], note["model"])
        return dialect.error_reply(status, messages, headers)


async def outcome(request, service: Service, ticket: Ticket) -> GenerationResult:
    """The job's result, unless the client leaves or the timeout passes first: then the job is
    taken out of the queue, or stopped where it runs, and the request answered 499 / 504."""
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({ticket.future, gone}, timeout=service.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not ticket.future.done():
        service.worker.abandon(ticket)
        if gone in done:
            raise RequestError(499, "client disconnected")
        raise RequestError(504, f"timed out after {service.timeout:g} s (waiting for the worker and running)")
    return ticket.future.result()


async def _disconnected(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


async def a1111_txt2img(request):
    return respond(await generation(request, a1111.Generation("txt2img", a1111.state_of(request.app)), None))


async def a1111_img2img(request):
    return respond(await generation(request, a1111.Generation("img2img", a1111.state_of(request.app)), None))


async def a1111_call(request):
    """The A1111 dialect's other routes (its lists, options, progress, interrupt), authorized here."""
    service: Service = request.app.state.service
    try:
        authorize(request, service.api_token, basic=True)
        body = b""
        if request.method == "POST":
            body = await read_body(request.receive, request.headers.get("content-length"), service.max_body,
                                   service.read_timeout)
        return respond(await a1111.call(a1111.state_of(request.app), request.method, request.url.path,
                                        dict(request.query_params), body))
    except Exception as e:
        return respond(a1111.error_reply(*answer(e, request.scope["sd.log"]["id"])))


async def native_generate(request):
    """POST /v1/sd/generate (sd/serve/native.py): its job's id is claimed before the body is read,
    so that the job's events can be followed from the start."""
    service: Service = request.app.state.service
    ref = request.scope["sd.log"]["id"]
    try:
        authorize(request, service.api_token)
        dialect = native.Generation.claim(service, request.headers.get("x-job-id"), ref)
    except Exception as e:
        return respond(native.error_reply(*answer(e, ref)))
    return respond(await generation(request, dialect, None))


def native_route(endpoint):
    """A route of sd's JSON dialect other than generate: authorized, errors in the dialect's shape."""
    async def handler(request):
        service: Service = request.app.state.service
        try:
            authorize(request, service.api_token)
            reply = await endpoint(request, service)
        except Exception as e:
            reply = native.error_reply(*answer(e, request.scope["sd.log"]["id"]))
        return respond(reply) if isinstance(reply, Reply) else reply  # or a stream
    return handler


async def workers_ai_search(request):
    service: Service = request.app.state.service
    try:
        authorize(request, service.api_token)
        catalogue = [(spec, not service.cache.registry.missing(spec.id)) for spec in REGISTRY.values()]
        return respond(workers_ai.search_reply(catalogue, dict(request.query_params)))
    except Exception as e:
        return respond(workers_ai.error_reply(*answer(e, request.scope["sd.log"]["id"])))


async def openai_images(request):
    """The OpenAI Images API (sd/serve/openai.py): generations and edits run as every generation
    does; the dialect answers the model list and the pictures kept for URL replies."""
    service: Service = request.app.state.service
    dialect = openai.Dialect(request.url.path, service.cache.registry, service.image_files, str(request.base_url))
    if request.method == "POST":
        return respond(await generation(request, dialect, None))
    try:
        if "name" not in request.path_params:  # a kept picture's unguessable name is its own credential
            authorize(request, service.api_token)
        return respond(dialect.lookup(request.path_params))
    except Exception as e:
        return respond(dialect.error_reply(*answer(e, request.scope["sd.log"]["id"])))


BAD_STATES = ("missing", "unreadable", "failed to load")


def workers_of(service: Service) -> list[Worker]:
    return getattr(service.worker, "workers", [service.worker])


async def healthz(request):
    """Liveness and readiness: 503 while shutting down or while a configured model can't load.
    The totals over every device, and each device's own state under `devices`."""
    from starlette.responses import JSONResponse
    service: Service = request.app.state.service
    workers = workers_of(service)
    loaded = list(dict.fromkeys(model for w in workers for model in w.cache.loaded))
    states = {model: "loaded" if model in loaded else service.cache.state(model) for model in REGISTRY}
    problems = [f"{model}: {state}" for model, state in states.items() if state in BAD_STATES]
    ok = not service.worker.closing and not problems
    running = service.worker.running
    return JSONResponse({"ok": ok, "problems": problems, "models": states, "queue": len(service.worker.waiting),
                         "queue_size": service.worker.queue_size, "running": running.job.model if running else None,
                         "loaded": loaded, "device": ",".join(w.name for w in workers),
                         "closing": service.worker.closing is not None, "devices": [w.health() for w in workers]},
                        status_code=200 if ok else 503)


async def metrics(request):
    """GET /metrics: the Prometheus text format (sd/serve/metrics.py); behind the API token when one is set."""
    from starlette.responses import Response

    from .metrics import CONTENT_TYPE
    service: Service = request.app.state.service
    try:
        authorize(request, service.api_token)
    except RequestError as e:
        return Response(f"{e}\n", status_code=e.status, headers=e.headers, media_type="text/plain")
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)


def authorize(request, api_token: str | None, basic: bool = False):
    """The API token as `Authorization: Bearer <token>`; with `basic`, also as the password of HTTP
    Basic credentials, any user name (A1111's clients send user:password)."""
    if api_token is None:
        return
    challenge = {"WWW-Authenticate": "Basic" if basic else "Bearer"}
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if not value.strip():
        raise RequestError(401, "authorization: missing; send Authorization: Bearer <API token>"
                           + (" or Basic credentials with the token as password" if basic else ""), headers=challenge)
    # Starlette decodes headers as latin-1: .encode("latin-1") gives back the bytes the client sent
    offered = value.strip().encode("latin-1") if scheme.lower() == "bearer" else None
    if basic and scheme.lower() == "basic":
        with contextlib.suppress(ValueError):  # not base64 (binascii.Error) or not ASCII: a wrong token
            offered = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
    if offered is None or not hmac.compare_digest(offered, api_token.encode("utf-8")):
        raise RequestError(401, "authorization: wrong API token", headers=challenge)


# Which dialect's envelope answers a path the framework itself refuses (no route, wrong method)
# or an unexpected error: the first whose prefix the path starts with; Workers AI's otherwise.
ENVELOPES: list[tuple[str, object]] = [("/v1/sd/", native), ("/v1/", openai), ("/sdapi/", a1111)]


def envelope_for(path: str):
    return next((dialect for prefix, dialect in ENVELOPES if path.startswith(prefix)), workers_ai)


async def http_error(request, exc):
    message = {404: f"no route for {request.method} {request.url.path}",
               405: f"method {request.method} not allowed here"}.get(exc.status_code, str(exc.detail))
    dialect = envelope_for(request.url.path)
    if dialect is workers_ai:
        return respond(workers_ai.error_reply(exc.status_code, [message], exc.headers, route=True))
    return respond(dialect.error_reply(exc.status_code, [message], exc.headers))


async def server_error(request, exc):
    dialect = envelope_for(request.url.path)
    return respond(dialect.error_reply(*answer(exc, request.scope.get("sd.log", {}).get("id", "-"))))


# (path, handler, method). A dialect adds its routes here and its prefix to ENVELOPES.
ROUTES = [("/sdapi/v1/txt2img", a1111_txt2img, "POST"), ("/sdapi/v1/img2img", a1111_img2img, "POST"),
          *((path, a1111_call, method) for path, method in a1111.CALLS),
          ("/ai/run/{model:path}", workers_ai_run, "POST"),
          ("/client/v4/accounts/{account_id}/ai/run/{model:path}", workers_ai_run, "POST"),
          ("/ai/models/search", workers_ai_search, "GET"),
          ("/client/v4/accounts/{account_id}/ai/models/search", workers_ai_search, "GET"),
          ("/healthz", healthz, "GET"), ("/metrics", metrics, "GET"),
          (openai.GENERATIONS, openai_images, "POST"), (openai.EDITS, openai_images, "POST"),
          ("/v1/models", openai_images, "GET"), ("/v1/models/{model:path}", openai_images, "GET"),
          ("/v1/images/files/{name}", openai_images, "GET")]

# sd's own dialect (sd/serve/native.py), and the playground page that uses it (public: it asks for the token)
ROUTES += [("/", playground.page, "GET"), ("/static/{name}", playground.asset, "GET"),
           ("/v1/sd/models", native_route(native.models), "GET"),
           ("/v1/sd/samplers", native_route(native.samplers), "GET"),
           ("/v1/sd/schedules", native_route(native.schedules), "GET"),
           ("/v1/sd/generate", native_generate, "POST"),
           ("/v1/sd/jobs/{job}", native_route(native.job_state), "GET"),
           ("/v1/sd/jobs/{job}/events", native_route(native.job_events), "GET"),
           ("/v1/sd/jobs/{job}/cancel", native_route(native.job_cancel), "POST")]


# ---------------------------------------------------------------- the access log


def clean(value) -> str:
    """A client's value made safe for one log line: control characters (CR, LF, ESC, NUL ...),
    spaces and backslashes escaped, so it can neither forge lines nor fields nor colour a terminal."""
    return "".join(c if c.isprintable() and c not in " \\" else "\\x20" if c == " " else
                   c.encode("unicode_escape").decode("ascii") for c in str(value))


def _size_and_steps(note: dict) -> tuple[str, str]:
    settings = note.get("settings") or (note["job"].kwargs if "job" in note else {})
    width, height, steps = (settings.get(k) for k in ("width", "height", "num_steps"))
    return (f"{width}x{height}" if width and height else "-"), (str(steps) if steps else "-")


class AccessLog:
    """One line per request on the `sd.serve` logger: client, method, path, then id=, model=,
    size=, steps=, status= and seconds, every client-supplied field escaped. Also: the request's
    id in an X-Request-Id header (500 messages name it), the connection guard told when the
    request's headers are in and when its response is out, and the request counted in `metrics`
    by its route's template and its status."""

    def __init__(self, app, guard: ConnectionGuard | None = None, metrics=None):
        self.app, self.guard, self.metrics = app, guard, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, client = time.perf_counter(), [], scope.get("client")
        note = scope["sd.log"] = {"id": uuid.uuid4().hex[:12]}
        if self.guard:
            self.guard.request_started(client)

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", note["id"].encode())]}
            await send(message)
            if self.guard and message["type"] == "http.response.body" and not message.get("more_body"):
                self.guard.response_sent(client)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            size, steps = _size_and_steps(note)
            shown = {499: "499(client-gone)"}.get(status[0], status[0]) if status else "-"
            log.info("%s %s %s id=%s model=%s size=%s steps=%s status=%s %.3fs", (client or ("-",))[0],
                     clean(scope.get("method")), clean(scope.get("path", "")), note["id"], clean(note.get("model", "-")),
                     size, steps, shown, time.perf_counter() - start)
            if self.metrics is not None:
                route = scope.get("route")  # set by Starlette's router on this scope when a route matched
                self.metrics.request_done(getattr(route, "path", "-"), status[0] if status else 0)


def create_app(service: Service):
    """The ASGI app around a Service."""
    try:
        import anyio
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.routing import Route

        from .metrics import Metrics
    except ImportError:
        raise RuntimeError(MISSING_EXTRA) from None
    if service.metrics is None:
        service.metrics = Metrics(workers_of(service))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.parsing = anyio.CapacityLimiter(2)  # big bodies are parsed off the event loop, two at a time
        service.worker.start()
        try:
            yield
        finally:
            await service.worker.stop()

    app = Starlette(routes=[Route(path, handler, methods=[method]) for path, handler, method in ROUTES],
                    middleware=[Middleware(AccessLog, guard=service.guard, metrics=service.metrics)], lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.router.redirect_slashes = False  # an API answers 404, not a redirect, for /ai/run/
    app.state.service = service
    return app


MISSING_EXTRA = "sd serve needs the server extra: pip install 'sd[server]'"
