"""`sd serve`: its flags, the checks made before it listens, and running it under uvicorn.

Startup refuses, with one line and exit status 2, what could never work: a flag out of its
range (or not finite), a device this machine lacks, a model source that is not a checkpoint
(headers are read, not weights). A `--model` source that does not exist yet is served 503 until
it appears. SIGTERM / Ctrl-C: queued requests are answered 503, the running one finishes, the
process exits 0 (a second Ctrl-C stops waiting).
"""

import argparse
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from ..errors import InputError
from ..prompts import STYLES
from ..registry import REGISTRY, Registry, UnknownModel, default_weights_dir, parse_overrides
from .app import MISSING_EXTRA, Service, create_app, workers_of
from .cache import ModelCache, memory_budget
from .connections import ConnectionGuard
from .image_files import DEFAULT_TTL, ImageFiles
from .speed import Speeds
from .router import Workers, unique_names
from .worker import Worker

log = logging.getLogger("sd.serve")

DEFAULT_QUEUE_SIZE = 32
DEFAULT_MAX_BODY_MB = 20
DEFAULT_TIMEOUT = 300.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 128


def number(kind: type, low: float, high: float, *, above_low: bool = False):
    """An argparse type: a finite `kind` in [low, high] (or (low, high]), with the rule in its error."""
    def parse(text: str):
        interval = f"{'(' if above_low else '['}{low:g}, {high:g}]"
        rule = f"must be a {'whole number' if kind is int else 'number'} in {interval}, got {text!r}"
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(rule) from None
        if not math.isfinite(value) or not (low < value if above_low else low <= value) or value > high:
            raise argparse.ArgumentTypeError(rule)
        return value
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, no usage block: `error: argument --port: must be a whole number in [1, 65535], got '99999'`."""
        self.exit(2, f"error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="sd serve", description="Serve the Workers AI text-to-image API.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=number(int, 1, 65535), default=8000, help="default 8000")
    p.add_argument("--weights-dir", default=None, help="where `sd download` puts the models "
                                                       "(default: $SD_WEIGHTS_DIR, else ./weights)")
    p.add_argument("--model", action="append", default=[], metavar="ID=SOURCE",
                   help="serve model ID from SOURCE (a .safetensors file or a diffusers folder); repeatable")
    p.add_argument("--api-token", default=None, help="require `Authorization: Bearer TOKEN` "
                                                     "(default: $SD_API_TOKEN; none: no authentication)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available); several, comma-"
                                    "separated (cuda:0,cuda:1), get a worker and model cache each; all: every CUDA "
                                    "device (else the default one); a device named twice gets two workers (cpu,cpu)")
    p.add_argument("--max-batch", type=number(int, 1, 1024), default=None,
                   help="images per UNet batch at most, queued requests that can share one run together; 1: no "
                        "batching (default: on a GPU what its free memory holds at the model's native size, up to "
                        "16; elsewhere 4)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 elsewhere")
    p.add_argument("--prompt-style", choices=STYLES, default=None,
                   help="how Workers AI and OpenAI prompts are read: plain (diffusers': the first 75 tokens) or "
                        "weighted (A1111's emphasis syntax, any length); A1111 API prompts are always weighted "
                        "(default: plain)")
    p.add_argument("--queue-size", type=number(int, 0, 100_000), default=DEFAULT_QUEUE_SIZE,
                   help=f"requests that may wait behind the running one; more get 429 (default {DEFAULT_QUEUE_SIZE})")
    p.add_argument("--max-body-mb", type=number(float, 0, 4096, above_low=True), default=DEFAULT_MAX_BODY_MB,
                   help=f"largest request body in MiB; larger get 413 (default {DEFAULT_MAX_BODY_MB})")
    p.add_argument("--cache-gb", type=number(float, 0, 1e6, above_low=True), default=None,
                   help="memory for loaded models in GiB, least recently used out first "
                        "(default: 80%% of the GPU's memory, or of RAM)")
    p.add_argument("--timeout", type=number(float, 0, 7 * 86400), default=DEFAULT_TIMEOUT,
                   help="seconds a request may wait plus run before a 504 (the job stops); a job expected to take "
                        f"far longer is refused up front; 0: no limit (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--read-timeout", type=number(float, 0, 3600, above_low=True), default=DEFAULT_READ_TIMEOUT,
                   help="seconds a request's headers, and its body (plus 1 s per 64 KiB), may take to arrive; "
                        f"slower ones get 408 and are closed (default {DEFAULT_READ_TIMEOUT:g})")
    p.add_argument("--max-connections", type=number(int, 1, 100_000), default=DEFAULT_MAX_CONNECTIONS,
                   help=f"open connections at most; more are answered 503 and closed (default "
                        f"{DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--url-ttl", type=number(float, 0, 86400), default=DEFAULT_TTL,
                   help="seconds a picture answered as a URL (OpenAI's response_format url) is kept; 0: such "
                        f"requests are refused (default {DEFAULT_TTL:g})")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve on a new local Ray: one replica per GPU, each with its own worker "
                        "and batching (the ray extra; a cluster: docs/SCALING.md)")
    p.add_argument("--replicas", type=number(int, 1, 1024), default=None,
                   help="with --ray: how many replicas (default: one per GPU, else 1)")
    p.add_argument("--public-url", type=public_url, default=None, metavar="URL",
                   help="this server's address as clients reach it (https://host/prefix behind a proxy), for the "
                        "URLs of kept pictures (default: the Host each request names)")
    return p


def public_url(text: str) -> str:
    """An argparse type: an http(s) URL with a host, no query or fragment."""
    from urllib.parse import urlsplit
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"must be http(s)://host[:port][/path], got {text!r}")
    return text


def devices_of(flag: str | None) -> list[str | None]:
    """The devices --device names, one worker each: None is the default device; `all` is every
    CUDA device, or the default device on a machine without one."""
    if flag is None:
        return [None]
    if flag.strip() == "all":
        import torch
        return [f"cuda:{k}" for k in range(torch.cuda.device_count())] or [None]
    return [name.strip() for name in flag.split(",")]


def model_caches(registry: Registry, devices: list[str | None], dtype, cache_gb: float | None) -> list[ModelCache]:
    """A model cache per device. Without --cache-gb, workers on one device share its budget."""
    from ..pipeline import default_device
    resolved = [device or default_device() for device in devices]
    return [ModelCache(registry, device=device, dtype=dtype,
                       max_bytes=int(cache_gb * 2 ** 30) if cache_gb is not None
                       else memory_budget(device) // resolved.count(device)) for device in resolved]


def check_device(name: str | None) -> str | None:
    """Why `name` can't hold tensors on this machine (None: it can, or it is the default)."""
    if name is None:
        return None
    if not name:
        return "--device: an empty name in the list (names are separated by single commas)"
    import torch
    try:
        torch.zeros(1, device=torch.device(name))
    except Exception as e:  # not compiled with CUDA, no such ordinal, no MPS ...: all mean the same here
        return f"--device {name}: not usable on this machine ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


class StartupError(Exception):
    """Why `sd serve` can never work with these flags: one line that names the flag."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # a bad flag (one line already printed), or --help
        return e.code if isinstance(e.code, int) else 2
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        return 2
    if args.replicas is not None and not args.ray:
        return _fail("--replicas: only with --ray (without it, one process serves the --device list)")
    if args.ray:
        try:
            from .ray_app import problem_under_ray, serve_on_local_ray
        except ImportError as e:
            if not (e.name or "").startswith("ray"):
                raise
            return _fail("--ray: needs the ray extra: pip install 'sd[ray]'")
        if problem := problem_under_ray(args):
            return _fail(problem)
    try:
        service = build_service(args)
    except StartupError as e:
        return _fail(str(e))
    _log_to_stderr()
    log_startup(service, args)
    if args.ray:  # each replica builds its own Service from the same flags; this one only checked them
        return serve_on_local_ray(args, sys.argv[1:] if argv is None else list(argv))
    return serve(uvicorn.Server(uvicorn_config(create_app(service), service.guard, args.host, args.port)), service)


def build_service(args: argparse.Namespace) -> Service:
    """The Service that `sd serve` runs for its parsed flags (a Ray Serve replica builds its own
    here too, sd/serve/ray_app.py), after the checks of what could never work (StartupError)."""
    if args.api_token is not None and not args.api_token.strip():
        raise StartupError("--api-token: empty (leave it out to serve without authentication)")
    try:
        overrides = parse_overrides(args.model)
    except (InputError, UnknownModel) as e:
        raise StartupError(str(e)) from None
    devices = devices_of(args.device)
    if problem := next(filter(None, map(check_device, devices)), None):
        raise StartupError(problem)
    registry = Registry(Path(args.weights_dir) if args.weights_dir else default_weights_dir(), overrides)
    import torch
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    caches = model_caches(registry, devices, dtype, args.cache_gb)
    cache = caches[0]  # the startup checks read files: the same on every device
    problems = [f"{model_id}{' (given with --model)' if model_id in overrides else ''}: {problem}"
                for model_id in REGISTRY if (problem := cache.problem(model_id))]
    if problems:
        raise StartupError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    names = unique_names([str(c.device) for c in caches])
    speeds = Speeds(args.timeout or None, ",".join(names))
    workers = [Worker(c, speeds, args.queue_size, max_batch=args.max_batch, name=name)
               for c, name in zip(caches, names)]
    token = args.api_token if args.api_token is not None else os.environ.get("SD_API_TOKEN") or None
    return Service(cache, workers[0] if len(workers) == 1 else Workers(workers), speeds, api_token=token,
                   max_body=int(args.max_body_mb * 2 ** 20), read_timeout=args.read_timeout,
                   guard=ConnectionGuard(args.read_timeout, args.max_connections), prompt_style=args.prompt_style,
                   image_files=ImageFiles(args.url_ttl, args.public_url))


def log_startup(service: Service, args: argparse.Namespace):
    """The server's own log (paths are shown here): each model's state, then the limits."""
    registry = service.cache.registry
    for model_id in REGISTRY:
        state = service.cache.state(model_id)
        log.info("%s", registry.missing_message(model_id) if state in ("missing", "not downloaded")
                 else f"{model_id}: ready ({registry.sources(model_id)[0]})")
    timeout = service.timeout
    log.info("device %s, max batch %s, queue %d, body limit %g MiB, timeout %s, read timeout %g s, %d connections, "
             "%s", ", ".join(w.name for w in workers_of(service)), args.max_batch or "auto", args.queue_size,
             args.max_body_mb, f"{timeout:g} s" if timeout else "none", args.read_timeout, args.max_connections,
             "API token required" if service.api_token else "no authentication")


def uvicorn_config(app, guard: ConnectionGuard, host: str, port: int):
    """uvicorn's h11 protocol inside the connection guard; client addresses as the sockets give
    them (no proxy headers: the guard finds connections by them); no WebSockets, no access log
    of uvicorn's own (the app writes one)."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, http=guard.protocol(), ws="none", lifespan="on",
                          access_log=False, log_level="info", server_header=False, proxy_headers=False)


def serve(server, service: Service) -> int:
    """Run uvicorn in a thread, where it installs no signal handlers (uvicorn 0.13+), and handle
    SIGINT / SIGTERM here: close the queue (waiting requests get 503), then ask uvicorn to shut
    down gracefully (it lets running requests finish); a second SIGINT stops waiting for them."""
    def on_signal(signum, frame):
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
            service.worker.interrupt()  # the running jobs stop at their next checkpoint too
        service.worker.close_from_any_thread("the server is shutting down")
        server.should_exit = True

    thread = threading.Thread(target=server.run, name="uvicorn")
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1  # not started: uvicorn logged why (the port taken, ...)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _log_to_stderr():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
