"""Workers driven without the web app (as a Ray replica would drive one), for tests/test_batching.py,
tests/test_devices.py and tests/test_metrics.py: model caches over a tiny random-weight model or an
instant stand-in pipeline, a recorder of the batches a worker runs, and a gate that holds a batch
after a given step until the test lets it go."""

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from sd.defaults import Defaults
from sd.interrupt import checkpoint
from sd.registry import REGISTRY, Registry
from sd.request import batch_of
from sd.serve.cache import ModelCache
from sd.serve.speed import Speeds
from sd.serve.worker import Worker

MODEL = "@cf/runwayml/stable-diffusion-v1-5-img2img"
OTHER = "@cf/lykon/dreamshaper-8-lcm"


class Recorder:
    """A worker's `metrics`: the images of each batch it finished, and its steps."""

    def __init__(self):
        self.batches: list[int] = []
        self.steps = 0

    def batch_done(self, device, images, seconds):
        self.batches.append(images)

    def step_done(self, device, seconds):
        self.steps += 1


class EchoPipeline:
    """generate() as the worker sees it, at once: `num_steps` steps (a checkpoint and the callback
    each), then per image an 8x8 picture whose settings are its prompt, negative prompt and seed.
    `calls`: the images of each call; `fail_above`: calls of more images raise it (an error)."""

    def __init__(self, defaults: Defaults | None = None):
        self.defaults = defaults or Defaults()
        self.calls: list[int] = []
        self.fail_above: tuple[int, Exception] | None = None

    def generate(self, prompt, *, negative_prompt=None, seed=None, num_images=None, num_steps=2, callback=None,
                 width=64, height=64, **_):
        prompts, negatives, seeds, batched = batch_of(prompt, negative_prompt, seed, num_images)
        self.calls.append(len(seeds))
        if self.fail_above and len(seeds) > self.fail_above[0]:
            raise self.fail_above[1]
        for i in range(num_steps):
            checkpoint()
            if callback:
                callback(SimpleNamespace(i=i, n=num_steps, denoised=torch.arange(len(seeds)).reshape(-1, 1)))
        images = []
        for p, n, s in zip(prompts, negatives, seeds):
            image = Image.new("RGB", (8, 8), "red")
            image.info["sd"] = dict(prompt=p, negative_prompt=n, seed=s, num_steps=num_steps, width=width,
                                    height=height, sampler="echo", schedule="default", guidance=1.0)
            images.append(image)
        return images if batched else images[0]


def echo_cache(folder: Path, device: str = "cpu") -> ModelCache:
    """A ModelCache whose every model is an EchoPipeline (one per model, in `cache.fakes`)."""
    from safetensors.torch import save_file
    stub = folder / "stub.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(stub))

    class EchoCache(ModelCache):
        def __init__(self):
            super().__init__(Registry(folder, {m: stub for m in REGISTRY}), device=device, max_bytes=2 ** 40)
            self.fakes = {}

        def _load(self, spec):
            self.fakes[spec.id] = EchoPipeline(self.defaults(spec.id))
            return self.fakes[spec.id]

        def used_bytes(self):
            return 0

    return EchoCache()


def model_cache(folder: Path, source: Path, model: str = MODEL) -> ModelCache:
    return ModelCache(Registry(folder, {model: source}), device="cpu", max_bytes=2 ** 40)


def worker(cache: ModelCache, max_batch: int | None = 8, **kw) -> Worker:
    w = Worker(cache, Speeds(None, "cpu"), 32, lambda pipe: 0.0, max_batch=max_batch, **kw)
    w.metrics = Recorder()
    return w


def run_jobs(w, jobs, during=None) -> tuple[list, list]:
    """Start the worker, queue every job before it takes one, run `during(tickets)` (a coroutine:
    it returns the tickets to wait for, default all), and give (tickets, their outcomes)."""
    async def main():
        w.start()
        try:
            tickets = [w.submit(job, f"job{k}") for k, job in enumerate(jobs)]
            awaited = (await during(tickets)) if during else tickets
            # the timeout only guards against a hang (a dead consumer), it is no expectation of speed
            outcomes = await asyncio.wait_for(asyncio.gather(*(t.future for t in awaited), return_exceptions=True), 60)
            return tickets, outcomes
        finally:
            await w.stop()
    return asyncio.run(main())


class Gate:
    """A worker listener that holds the worker thread when a ticket (one `only` accepts) reports
    step `at`, until `release()`; `reached` is set once it holds."""

    def __init__(self, at: int = 1, only=lambda ticket: True):
        self.at, self.only, self.reached, self.open = at, only, threading.Event(), threading.Event()

    def __call__(self, ticket):
        if ticket.state == "running" and ticket.step == self.at and not self.open.is_set() and self.only(ticket):
            self.reached.set()
            assert self.open.wait(60), "the gate was never released"

    async def wait(self):
        assert await asyncio.to_thread(self.reached.wait, 60), "no batch reached the gate"

    def release(self):
        self.open.set()


class AppServer:
    """The app around a given Service (several workers, say) under uvicorn in a thread, as
    server_fixtures.InProcessServer runs one around a cache."""

    def __init__(self, service):
        import uvicorn
        from server_fixtures import free_port, wait_until

        from sd.serve.app import create_app
        from sd.serve.cli import uvicorn_config
        from sd.serve.connections import ConnectionGuard
        self.service, self.port = service, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        service.guard = ConnectionGuard(30.0, 128)
        config = uvicorn_config(create_app(service), service.guard, "127.0.0.1", self.port)
        config.log_level = "warning"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "started")
        assert self.server.started, "the server did not start"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def several(folder: Path, n: int, **kw):
    """A Service with n CPU workers (cpu#0, cpu#1, ...) over echo caches, as `--device cpu,cpu` makes it."""
    from sd.serve.app import Service
    from sd.serve.router import Workers, unique_names
    caches = [echo_cache(folder) for _ in range(n)]
    speeds = Speeds(None, "cpu")
    workers = [Worker(c, speeds, kw.get("queue_size", 32), lambda pipe: 0.0, max_batch=kw.get("max_batch", 4),
                      name=name) for c, name in zip(caches, unique_names(["cpu"] * n))]
    return Service(caches[0], Workers(workers), speeds, api_token=kw.get("api_token"))
