"""Load test for `sd serve`: N concurrent clients for T seconds against any generation route, printing
throughput (images/s), latency (p50/p95/p99) and errors; with --serve it starts the server itself
once per --max-batch value and sweeps --concurrency. The table is Markdown; --plot draws throughput
and latency against concurrency (matplotlib, the `bench` extra), --json keeps the numbers.

Each client sends a request, waits for its answer, and sends the next, until T seconds have passed;
requests in flight then finish and count. Throughput is the images answered 200 over the time from
the first request to the last answer; latency is per request, from sending to the whole answer.
A request's body is --body with its "seed" (if it has one) counted up, so no two are alike; the
images a request asks for are read from it (A1111's batch_size x n_iter, OpenAI's n, num_images).

    pip install -e '.[server,bench]'
    # against a running server, any dialect
    python scripts/loadtest.py --url http://127.0.0.1:8000 --route /ai/run/@cf/runwayml/stable-diffusion-v1-5-img2img \\
        --body '{"prompt": "a red circle", "width": 256, "height": 256, "num_steps": 4, "seed": 0}' \\
        --concurrency 1 2 4 8 --seconds 30
    # docs/SERVING.md's table and plot: the tiny model through the A1111 route, max-batch 1 vs the default
    python scripts/loadtest.py --serve "--device cpu" --max-batch 1 auto --concurrency 1 2 4 8 --seconds 30 \\
        --json docs/serving.json --plot docs/serving.png
"""

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "sd" / "assets" / "tiny-shapes.safetensors"
DEFAULT_ROUTE = "/sdapi/v1/txt2img"
DEFAULT_BODY = {"prompt": "a small red circle on the left, blue background", "width": 64, "height": 64,
                "steps": 20, "cfg_scale": 4, "sampler_name": "DPM++ 2M", "seed": 0}


@dataclass
class Run:
    """One load level's outcome."""
    max_batch: str
    concurrency: int
    seconds: float
    requests: int
    images: int
    errors: int
    images_per_second: float
    p50: float
    p95: float
    p99: float
    statuses: dict


def images_of(body: dict) -> int:
    """The images one request asks for, in any dialect's field."""
    if "batch_size" in body or "n_iter" in body:
        return body.get("batch_size", 1) * body.get("n_iter", 1)
    return body.get("n") or body.get("num_images") or 1


def summarize(max_batch: str, concurrency: int, seconds: float, answers: list[tuple[float, int]],
              per_request: int) -> Run:
    """answers: (latency, status) per request."""
    latencies = np.array([latency for latency, _ in answers]) if answers else np.zeros(1)
    ok = sum(status == 200 for _, status in answers)
    statuses: dict[str, int] = {}
    for _, status in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return Run(max_batch, concurrency, seconds, len(answers), ok * per_request, len(answers) - ok,
               ok * per_request / seconds if seconds > 0 else 0.0, float(p50), float(p95), float(p99), statuses)


async def load(url: str, body: dict, concurrency: int, seconds: float, headers: dict, timeout: float,
               max_batch: str = "-") -> Run:
    """`concurrency` clients, each sending the next request as soon as its last is answered, for `seconds`."""
    import httpx
    answers: list[tuple[float, int]] = []
    counter = iter(range(10 ** 12))
    start = time.perf_counter()
    deadline = start + seconds

    async def client(http):
        while time.perf_counter() < deadline:
            sent = {**body, "seed": body["seed"] + next(counter)} if "seed" in body else body
            began = time.perf_counter()
            try:
                status = (await http.post(url, json=sent, headers=headers)).status_code
            except httpx.HTTPError:
                status = 0  # no answer: a refused or broken connection, or past --timeout
            answers.append((time.perf_counter() - began, status))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return summarize(max_batch, concurrency, time.perf_counter() - start, answers, images_of(body))


def warm_up(url: str, body: dict, headers: dict, timeout: float):
    """One request, unmeasured: the server loads the model (and, on a GPU, sizes its batches)."""
    import httpx
    r = httpx.post(url, json=body, headers=headers, timeout=timeout)
    if r.status_code != 200:
        raise SystemExit(f"the warm-up request got {r.status_code}: {r.text[:500]}")


# ---------------------------------------------------------------- a server of our own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sd.serve ARGS --port P [--max-batch N]` until stopped (SIGTERM), its log in a file."""

    def __init__(self, args: list[str], max_batch: str, log: Path, threads: int | None):
        self.url = f"http://127.0.0.1:{free_port()}"
        flags = [] if max_batch == "auto" else ["--max-batch", max_batch]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "sd.serve", "--port", self.url.rsplit(":", 1)[1], *args,
                                      *flags], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, seconds: float = 120):
        import httpx
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the server did not answer /healthz within {seconds:g} s; see {self.log.name}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------- output


HEADER = "| max batch | clients | requests | images/s | p50 s | p95 s | p99 s | errors |"


def row(run: Run) -> str:
    errors = f"{run.errors} ({', '.join(f'{k}: {v}' for k, v in run.statuses.items() if k != '200')})" \
        if run.errors else "0"
    return (f"| {run.max_batch} | {run.concurrency} | {run.requests} | {run.images_per_second:.2f} | {run.p50:.2f} | "
            f"{run.p95:.2f} | {run.p99:.2f} | {errors} |")


def plot(runs: list[Run], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for k, max_batch in enumerate(dict.fromkeys(r.max_batch for r in runs)):
        clients = sorted({r.concurrency for r in runs if r.max_batch == max_batch})
        point = {c: [r for r in runs if (r.max_batch, r.concurrency) == (max_batch, c)] for c in clients}
        median = {field: [float(np.median([getattr(r, field) for r in point[c]])) for c in clients]
                  for field in ("images_per_second", "p50", "p95")}
        color, name = f"C{k}", f"max batch {max_batch}"
        left.plot(clients, median["images_per_second"], marker="o", color=color, label=name)
        right.plot(clients, median["p50"], marker="o", color=color, label=f"{name}, p50")
        right.plot(clients, median["p95"], marker="x", linestyle="--", color=color, label=f"{name}, p95")
    for axis, label in ((left, "images / s"), (right, "latency, s")):
        axis.set_xscale("log", base=2)
        ticks = sorted({r.concurrency for r in runs})
        axis.set_xticks(ticks, labels=[str(c) for c in ticks])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server (default with neither: --serve with its defaults)")
    target.add_argument("--serve", metavar="ARGS", help="start `sd serve ARGS` here, once per --max-batch (default: "
                        f"the tiny model as the default model on the CPU: --device cpu --model ...={TINY.name})")
    p.add_argument("--max-batch", nargs="+", default=["1", "auto"], help="with --serve: the values to compare, a "
                   "server each, all up at once and their runs interleaved (auto: the server's default; default: "
                   "1 auto)")
    p.add_argument("--threads", type=int, help="with --serve: the server's torch threads (OMP_NUM_THREADS; default: "
                   "torch's own, one per core)")
    p.add_argument("--route", default=DEFAULT_ROUTE, help=f"default {DEFAULT_ROUTE}")
    p.add_argument("--body", type=json.loads, default=DEFAULT_BODY, help="the JSON body (default: the tiny model's "
                   "64x64 picture in 20 steps)")
    p.add_argument("--token", default=os.environ.get("SD_API_TOKEN"), help="sent as Authorization: Bearer")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=30.0, help="per load level (default 30)")
    p.add_argument("--rounds", type=int, default=1, help="with --serve: sweeps over every setting (default 1); the "
                   "plot shows each point's median")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a client waits for one answer")
    p.add_argument("--json", type=Path, help="write every run's numbers here")
    p.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    p.add_argument("--from-json", type=Path, metavar="JSON", help="measure nothing: the table and plot of the "
                   "runs --json wrote")
    p.add_argument("--title", help="the plot's title (default: the route and the seconds per point)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    runs: list[Run] = []
    if not args.from_json:
        print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs",
              flush=True)
    print(HEADER + "\n|---|---|---|---|---|---|---|---|", flush=True)
    if args.from_json:
        runs = [Run(**r) for r in json.loads(args.from_json.read_text())]
        print("\n".join(map(row, runs)))
    elif args.url:
        for concurrency in args.concurrency:
            runs.append(asyncio.run(load(args.url + args.route, args.body, concurrency, args.seconds, headers,
                                         args.timeout)))
            print(row(runs[-1]), flush=True)
    else:
        serve_args = shlex.split(args.serve) if args.serve else \
            ["--device", "cpu", "--model", f"@cf/runwayml/stable-diffusion-v1-5-img2img={TINY}"]
        logs = Path(tempfile.mkdtemp(prefix="sd-loadtest-"))
        print(f"# the servers' logs: {logs}", flush=True)
        # Every server up at once (an idle one costs no CPU), and their runs interleaved, so that the
        # noise of a shared machine falls on each setting alike.
        servers = {mb: Server(serve_args, mb, logs / f"server-max-batch-{mb}.log", args.threads)
                   for mb in args.max_batch}
        try:
            for server in servers.values():
                server.wait_ready()
                warm_up(server.url + args.route, args.body, headers, args.timeout)
            for _ in range(args.rounds):
                for concurrency in args.concurrency:
                    for max_batch, server in servers.items():
                        runs.append(asyncio.run(load(server.url + args.route, args.body, concurrency, args.seconds,
                                                     headers, args.timeout, max_batch)))
                        print(row(runs[-1]), flush=True)
        finally:
            for server in servers.values():
                server.stop()
    if not args.from_json:
        print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    if args.plot:
        plot(runs, args.plot, args.title or f"sd serve, {args.route}, {args.seconds:g} s per point (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
