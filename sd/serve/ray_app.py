"""`sd serve` past one machine, on Ray Serve (the `ray` extra; docs/SCALING.md).

Two deployments make the application:

    Replica   one per GPU (`ray_actor_options: {num_gpus: 1}`): the Service that `sd serve` builds
              from the same flags (cli.build_service: the same checks, models, worker, batching and
              limits) and its app (app.create_app: the same routes, dialects and answers).
    Ingress   where Ray's HTTP proxy sends each request (no GPU): it reads the body, within the
              body limit and deadline, and streams the request through a Replica, which Ray picks
              (the less busy of two), passing back each message the app sends as it sends it (so
              progress streams stream). It answers what a replica cannot: a replica that dies with
              the request in it is a 503 with Retry-After in the request's dialect (Ray's proxy
              would answer a bare 500), and Ray's router queue over its limit a 429, as a full
              queue is answered by `sd serve`.

`sd serve --ray [--replicas N]` runs it on a new local Ray (serve_on_local_ray); `serve run` /
`serve deploy` take deploy/ray/serve.yaml, whose application `args` are `sd serve` flags (app).
The core never imports this module, nor does `sd serve` without --ray: Ray is imported here only.
"""

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from .app import answer, create_app, envelope_for, respond
from .batching import CPU_MAX_BATCH, GPU_MAX_BATCH
from .cli import _log_to_stderr, build_service, devices_of, log_startup, parser
from .connections import read_body
from .jobs import RequestError

log = logging.getLogger("sd.serve")

# The parts of an ASGI request scope that the app reads (Ray's own additions stay behind).
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
              "headers", "client", "server")
SHUTDOWN_WAIT_S = 60.0  # Ray Serve's graceful stop: replicas finish their requests (20 s at most), its controller 30 s
LEAVE_GRACE_S = 5.0     # a client gone: how long the app has to hear it (and stop the job) before its task is cancelled
# `sd serve` flags that are the deployment's business under Ray, not an application argument.
NOT_ARGS = {"host": "Ray's proxy listens: set http_options.host in the Serve config",
            "port": "Ray's proxy listens: set http_options.port in the Serve config",
            "ray": "the Serve config is Ray Serve already",
            "replicas": "set num_replicas (or autoscaling_config) of the Replica deployment in the Serve config"}


def parse_flags(flags: list[str]) -> argparse.Namespace:
    """`sd serve`'s flags read by its own parser, then checked for Ray; a bad one is a ValueError
    that names it (Ray shows it where `serve run` was typed, or in the application's status)."""
    p = parser()

    def refuse(status=0, message=None):
        raise ValueError((message or "--help: not an application argument").strip().removeprefix("error: "))
    p.exit = refuse  # Parser.error() ends in exit(2, "error: argument --port: ...")
    args = p.parse_args(flags)
    if problem := problem_under_ray(args):
        raise ValueError(problem)
    return args


def problem_under_ray(args: argparse.Namespace) -> str | None:
    """What `sd serve` takes but a Ray replica cannot: several devices, or a GPU other than its own."""
    devices = devices_of(args.device)
    if len(devices) > 1 or (devices[0] or "").startswith("cuda:") and devices[0] != "cuda:0":
        return (f"--device {args.device}: one device per replica under Ray, which gives each replica its own GPU "
                "as cuda:0; run more replicas instead")
    return None


def flags_of(args: dict) -> list[str]:
    """A Serve config's application `args` as `sd serve` flags: {"weights-dir": "/w", "model": ["ID=SOURCE",
    ...], "max-batch": 8} -> ["--weights-dir", "/w", "--model", "ID=SOURCE", ..., "--max-batch", "8"]."""
    flags = []
    for name, value in args.items():
        if name in NOT_ARGS:
            raise ValueError(f"args: {name}: not an application argument ({NOT_ARGS[name]})")
        for one in value if isinstance(value, list) else [value]:
            flags += [f"--{name}"] + ([] if one is True else [str(one)])
    return flags


def application(args: argparse.Namespace, flags: list[str], *, gpus: bool, replicas: int | None = None):
    """The Ingress bound to the Replica deployment, each given the flags. A replica takes at most
    what its worker holds (its queue and a running batch), so that Ray's router, not a replica's
    429, decides where a request waits; --queue-size more may wait at the router (per Ingress
    replica). A Serve config's `deployments` override any of these options."""
    batch = args.max_batch or (GPU_MAX_BATCH if gpus else CPU_MAX_BATCH)
    replica = Replica.options(ray_actor_options={"num_gpus": 1} if gpus else {"num_cpus": 1},
                              max_ongoing_requests=args.queue_size + batch,
                              max_queued_requests=max(args.queue_size, 1),
                              **({"num_replicas": replicas} if replicas else {}))
    return Ingress.options(max_ongoing_requests=args.max_connections).bind(replica.bind(flags), flags)


def app(args: dict):
    """The application builder of `serve run` / `serve deploy` (import_path: sd.serve.ray_app:app),
    `args` being `sd serve` flags by name. Replicas ask for a GPU each unless `device: cpu`."""
    flags = flags_of(args)
    parsed = parse_flags(flags)
    return application(parsed, flags, gpus=parsed.device != "cpu")


def _clean(scope: dict) -> dict:
    return {key: scope[key] for key in SCOPE_KEYS if key in scope}


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """Ray's proxy -> a Replica, with the answers only the caller of a replica can give."""

    def __init__(self, replica, flags: list[str]):
        self.args = parse_flags(flags)
        _log_to_stderr()
        self.replica = replica.options(stream=True)

    def __serve_build_asgi_app__(self):
        async def asgi(scope, receive, send):  # a coroutine function: what uvicorn takes for ASGI 3 (a method is not)
            await self.forward(scope, receive, send)
        return asgi

    async def forward(self, scope, receive, send):
        if scope["type"] == "lifespan":  # nothing to start or stop: answer the protocol
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return
        ref, started = uuid.uuid4().hex[:12], False
        try:
            # The body's limit and deadline, as the app reads them (its read_body), checked here
            # where the bytes arrive: a body too large is refused before the token is (sd serve
            # checks the token first).
            body = await read_body(receive, _content_length(scope), int(self.args.max_body_mb * 2 ** 20),
                                   self.args.read_timeout)
            async for message in self.replica.request.remote(_clean(scope), body):
                started = started or message["type"] == "http.response.start"
                await send(message)
            if not started:
                raise RuntimeError("the replica ended the request without an answer")
        except Exception as e:
            if started:
                raise  # the answer has begun: nothing left to do but cut the connection
            error = e
            if isinstance(e, RayActorError):
                log.warning("request %s: the replica running it died (%s)", ref, type(e).__name__)
                error = RequestError(503, "the replica running this request stopped; try again (another replica "
                                          "answers, or this one once Ray has replaced it)", {"Retry-After": "1"})
            elif isinstance(e, BackPressureError):
                error = RequestError(429, f"every replica is busy and {self.args.queue_size} requests wait for "
                                          "one; try again later", {"Retry-After": "1"})
            status, messages, headers = answer(error, ref)
            if status != 499:  # a client that left reads nothing
                reply = envelope_for(scope["path"]).error_reply(status, messages, headers)
                await respond(reply)(scope, receive, send)


def _content_length(scope) -> str | None:
    return next((value.decode("latin-1") for name, value in scope["headers"] if name.lower() == b"content-length"),
                None)


@serve.deployment(ray_actor_options={"num_gpus": 1})
class Replica:
    """One device's Service and app, built from the `sd serve` flags (StartupError: Ray shows the
    message and retries the replica, as for any constructor that fails)."""

    async def __init__(self, flags: list[str]):
        args = parse_flags(flags)
        self.service = build_service(args)
        self.service.guard = None  # connections are Ray's proxy's: no header deadline or cap here
        _log_to_stderr()
        log_startup(self.service, args)
        self.app = create_app(self.service)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()  # the app's startup: the worker starts on this event loop

    async def __del__(self):  # Ray's graceful stop, once the requests in flight are done
        if hasattr(self, "lifespan"):  # not when the constructor failed
            await self.lifespan.__aexit__(None, None, None)

    async def request(self, scope: dict, body: bytes):
        """One HTTP request through the app; each ASGI message it sends, as sent. The client
        leaving cancels this (Ray cancels the Ingress's request and so its call here), which the
        app hears as `http.disconnect`, as under uvicorn: it stops the job and ends."""
        sent, left = asyncio.Queue(), asyncio.Event()
        unread = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if unread:
                return unread.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.put_nowait(message)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                yield message
        finally:
            left.set()
            if not task.done():
                await asyncio.wait({task}, timeout=LEAVE_GRACE_S)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                task.exception()  # the app logged it, and answered 500 when it could


def serve_on_local_ray(args: argparse.Namespace, flags: list[str]) -> int:
    """`sd serve --ray`: a new local Ray (this machine's CPUs and GPUs), the application on it
    (one replica per GPU unless --replicas; CPU replicas where there is no GPU or --device cpu),
    Ray's proxy on --host:--port; SIGINT / SIGTERM: Ray Serve's graceful stop, then Ray's."""
    import torch
    gpus = args.device != "cpu" and torch.cuda.is_available()
    replicas = args.replicas or (torch.cuda.device_count() if gpus else 1)
    start = time.monotonic()
    # a cluster of this machine alone: its own processes, reached over loopback only
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    up = time.monotonic()
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(args, flags, gpus=gpus, replicas=replicas), name="sd", route_prefix="/")
    except Exception as e:  # a replica that never started (Ray retried it), a port taken ...
        log.error("Ray Serve did not start the application: %s", e)
        ray.shutdown()
        return 1
    log.info("Ray up in %.1f s, %d %s replica%s ready %.1f s later; serving on http://%s:%d", up - start, replicas,
             "GPU" if gpus else "CPU", "s" if replicas > 1 else "", time.monotonic() - up, args.host, args.port)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt  # a second one: stop waiting for the graceful stop
        stop.set()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
        log.info("shutting down: requests in flight finish, then the replicas and Ray stop")
        # in a thread, bounded: with Ray's own processes already stopped (a signal to the whole
        # process group, as from a terminal or systemd) it can wait on them for ever
        graceful = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
        graceful.start()
        graceful.join(SHUTDOWN_WAIT_S)
    except KeyboardInterrupt:
        log.info("stopping without waiting")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
    return 0
