"""The bounded queue in front of one thread that runs the jobs of one device, compatible ones
together in one UNet batch (sd/serve/batching.py), and stops the jobs clients gave up on.

A batch stops within a UNet block (sd/interrupt.py) once every job in it is given up. A job given
up alone is answered at once by whoever gave up on it; its rows of the batch are still computed
(a sampler's batch cannot shrink mid-run) and dropped at the end, and the others finish.

Queue bookkeeping happens on the event loop only; the thread loads the model (timing its first
UNet call, sd/serve/speed.py, and sizing its batches), generates and encodes the PNGs. Nothing
here needs the web app: whatever runs an asyncio loop can start a Worker, submit jobs and await
their tickets' futures (a Ray Serve replica that owns one device, say).
"""

import asyncio
import collections
import contextlib
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..interrupt import Interrupted, checkpoint, interruptible
from ..pngmeta import png_metadata
from . import batching, speed
from .cache import ModelCache
from .jobs import GenerationJob, GenerationResult, Picture, RequestError

log = logging.getLogger("sd.serve")
_UNPLANNED = object()


class Ticket:
    """A job's place: its future (set on the event loop), the flag that stops it (read by the
    thread), and its progress (written by the thread after every step, read by anyone): its own
    rows of the batch it runs in."""
    __slots__ = ("job", "ref", "future", "stop", "state", "step", "steps", "denoised", "started", "share", "worker")

    def __init__(self, job: GenerationJob, ref: str, future: asyncio.Future, worker: "Worker | None" = None):
        self.job, self.ref, self.future, self.stop = job, ref, future, threading.Event()
        self.state = "queued"           # queued, running, done, failed, stopped
        self.step, self.steps = 0, 0    # steps done of the run's total
        self.denoised = None            # the last step's x0 prediction of its images: latents for a preview
        self.started: float | None = None
        self.share = _UNPLANNED         # its part of a batch (batching.Share), None: it runs alone
        self.worker = worker            # the Worker (so the device and model cache) it is queued on


class Worker:
    """One device's queue and thread. `max_batch`: images per UNet batch at most (1: no batching;
    None: per model, from the device's memory when the model loads, batching.batch_limit)."""

    def __init__(self, cache: ModelCache, speeds: speed.Speeds, queue_size: int, measure=speed.measure, *,
                 max_batch: int | None = 1, name: str | None = None, size_batches=batching.batch_limit):
        self.cache, self.speeds, self.queue_size, self.measure = cache, speeds, queue_size, measure
        self.max_batch, self.size_batches = max_batch, size_batches
        self.name = name or str(cache.device)       # the device, as /healthz and /metrics name it
        self.limits: dict[str, int] = {}            # model id -> images per batch, when max_batch is None
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running_batch: list[Ticket] = []
        self.closing: str | None = None
        self.metrics = None                         # sd.serve.metrics.Metrics, told of batches and steps
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Called with a ticket whenever its state or progress changes: on the event loop when it
        # is queued, then from the worker thread.
        self.listeners: list = []

    @property
    def running(self) -> Ticket | None:
        """The running batch's first job (None: idle)."""
        return self.running_batch[0] if self.running_batch else None

    @property
    def backlog(self) -> int:
        """Jobs waiting or running here."""
        return len(self.waiting) + len(self.running_batch)

    def expects(self, model: str) -> bool:
        """The model is loaded here, or will be for a job queued or running here."""
        return model in self.cache.loaded or any(t.job.model == model for t in (*self.running_batch, *self.waiting))

    def batch_room(self, model: str) -> int:
        """Images a batch of this model may hold here (1 until an automatic limit is measured)."""
        return self.max_batch if self.max_batch is not None else self.limits.get(model, 1)

    def health(self) -> dict:
        """This device's part of /healthz."""
        running = self.running
        return {"device": self.name, "queue": len(self.waiting), "queue_size": self.queue_size,
                "running": running.job.model if running else None,
                "batch": sum(self._images(t) for t in self.running_batch),
                "max_batch": self.max_batch if self.max_batch is not None else dict(self.limits) or "auto",
                "loaded": list(self.cache.loaded), "closing": self.closing is not None}

    # ------------------------------------------------------------ on the event loop

    def start(self):
        """Open the queue and start taking jobs, on the running event loop (again after stop())."""
        self.closing = None
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-worker")
        self._task = self._loop.create_task(self._consume())

    async def stop(self):
        self.close("the server is shutting down")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def full(self) -> bool:
        return len(self.waiting) + (self.running is not None) > self.queue_size

    def check_open(self):
        if self.closing:
            raise RequestError(503, f"{self.closing}; try again later")
        if self.full:
            raise RequestError(429, f"the queue is full ({self.queue_size} waiting behind the one running); "
                                    "try again later", headers={"Retry-After": "1"})

    def submit(self, job: GenerationJob, ref: str) -> Ticket:
        self.check_open()
        if self._wakeup is None:
            raise RuntimeError("the worker is not started (run the app with its lifespan)")
        ticket = Ticket(job, ref, self._loop.create_future(), self)
        self.waiting.append(ticket)
        self._wakeup.set()
        self._changed(ticket)
        return ticket

    def abandon(self, ticket: Ticket):
        """Its client left, timed out or interrupted it: out of the queue, or stopped where it runs
        (its batch stops at the next checkpoint when no other job of it is left)."""
        ticket.stop.set()
        with contextlib.suppress(ValueError):
            self.waiting.remove(ticket)

    def interrupt(self):
        """Stop every running job at its next checkpoint (a second Ctrl-C)."""
        for ticket in self.running_batch:
            ticket.stop.set()

    def close(self, reason: str):
        """Answer every waiting job with 503 and take no new ones; the running batch finishes."""
        self.closing = reason
        while self.waiting:
            ticket = self.waiting.popleft()
            if not ticket.future.done():
                ticket.future.set_exception(RequestError(503, f"{reason}; try again later"))

    def close_from_any_thread(self, reason: str):
        """close(), from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close, reason)

    async def _consume(self):
        while True:
            await self._wakeup.wait()
            if not self.waiting:
                self._wakeup.clear()
                continue
            batch = self.running_batch = self._next_batch()
            try:
                outcomes = await self._loop.run_in_executor(self._executor, self._run, batch)
            except asyncio.CancelledError:
                for ticket in batch:
                    if not ticket.future.done():
                        ticket.future.set_exception(RequestError(503, "the server is shutting down"))
                raise
            except Exception as e:  # never ends the loop
                outcomes = [e] * len(batch)
            finally:
                self.running_batch = []
            for ticket, outcome in zip(batch, outcomes):
                if ticket.future.done() or outcome is None:
                    continue
                if not isinstance(outcome, Exception):  # finished before its stop was seen: handed over
                    ticket.future.set_result(outcome)
                elif not ticket.stop.is_set():          # whoever gave up on it answered already
                    ticket.future.set_exception(outcome)

    def _next_batch(self) -> list[Ticket]:
        """The oldest job and, when it can share, the next compatible ones up to the batch's room
        (the queue's order otherwise kept: the oldest always runs next)."""
        head = self.waiting.popleft()
        room = self.batch_room(head.job.model)
        share = self._share(head) if room > 1 else None
        if share is None:
            return [head]
        batch, used = [head], share.images
        for ticket in list(self.waiting):
            if used >= room:
                break
            if ticket.job.model != head.job.model:
                continue
            other = self._share(ticket)
            if other is not None and other.key == share.key and used + other.images <= room:
                self.waiting.remove(ticket)
                batch.append(ticket)
                used += other.images
        return batch

    def _share(self, ticket: Ticket):
        """The ticket's batching.Share, planned once (its random seed drawn then); None: alone."""
        if ticket.share is _UNPLANNED:
            pipe = self.cache.pipelines.get(ticket.job.model)  # the thread is idle: nothing loads now
            try:
                share = batching.share_of(ticket.job, self.cache.defaults(ticket.job.model).prompt_style,
                                          getattr(pipe, "tokenizers", None))
            except Exception:  # an unknown model, say: it runs alone, and fails there with its own error
                share = None
            if share is None and pipe is None:
                return None  # weighted prompts: planned again once their model's tokenizers are here
            ticket.share = share
        return ticket.share

    @staticmethod
    def _images(ticket: Ticket) -> int:
        share = ticket.share
        return share.images if isinstance(share, batching.Share) else ticket.job.kwargs.get("num_images") or 1

    # ------------------------------------------------------------ in the worker thread

    def _changed(self, ticket: Ticket, state: str | None = None):
        if state is not None:
            ticket.state = state
        for listener in self.listeners:
            listener(ticket)

    def _run(self, batch: list[Ticket]) -> list:
        """Each ticket's GenerationResult or exception, in order; None for a ticket given up
        while it ran (its images dropped)."""
        start, outcomes = time.perf_counter(), {}

        def fail(ticket, error):
            outcomes[ticket] = error
            self._changed(ticket, "stopped" if isinstance(error, Interrupted) else "failed")

        for ticket in batch:
            if ticket.stop.is_set():
                fail(ticket, Interrupted("given up before it started"))
            else:
                ticket.started = time.time()
                self._changed(ticket, "running")
        live = [t for t in batch if t not in outcomes]
        if not live:
            return [outcomes[t] for t in batch]
        try:
            pipe = self._load(batch[0].job.model)
        except Exception as e:
            for ticket in live:
                fail(ticket, e)
            live = []
        for ticket in list(live):
            try:
                self.speeds.check(ticket.job, pipe.defaults)
            except Exception as e:
                fail(ticket, e)
                live.remove(ticket)
        if live:
            outcomes.update(zip(live, self._generate(pipe, live, start)))
        return [outcomes[t] for t in batch]

    def _load(self, model: str):
        pipe = self.cache.get(model)
        if model not in self.speeds.rates:
            self.speeds.rates[model] = self.measure(pipe)
            log.info("%s: a UNet call takes %.3g s per megapixel here", model, self.speeds.rates[model])
        if self.max_batch is None and model not in self.limits:
            self.limits[model] = self.size_batches(pipe)
            log.info("%s on %s: up to %d images per batch", model, self.name, self.limits[model])
        return pipe

    def _generate(self, pipe, tickets: list[Ticket], start: float) -> list:
        """One generate call for the tickets (one UNet batch); their outcomes, in order. A batch
        the device has no memory for runs again in halves, and the model's limit comes down."""
        alone = len(tickets) == 1
        # A planned job runs by its plan even alone, so that the seeds it was given are the ones used.
        shares = [t.share for t in tickets]
        planned = all(isinstance(share, batching.Share) for share in shares)  # always, for several jobs
        kwargs = batching.batch_kwargs(shares, tickets[0].job.kwargs) if planned else tickets[0].job.kwargs
        rows = batching.rows(shares) if planned else [slice(None)]
        began = last = time.perf_counter()

        def between_steps(step):
            nonlocal last
            checkpoint()  # a compiled UNet has no checkpoints inside: stop between its steps
            now = time.perf_counter()
            if self.metrics is not None and step.i > 0:  # the first step also encodes the prompts
                self.metrics.step_done(self.name, now - last)
            last = now
            for ticket, own in zip(tickets, rows):
                if ticket.state == "stopped":
                    continue
                ticket.step, ticket.steps, ticket.denoised = step.i + 1, step.n, step.denoised[own]
                self._changed(ticket, "stopped" if ticket.stop.is_set() else None)

        out_of_memory = False
        try:
            with interruptible(lambda: all(t.stop.is_set() for t in tickets)):
                images = pipe.generate(**kwargs, callback=between_steps)
        except Interrupted as e:
            log.info("request %s: stopped %.1f s into its run (its client left, timed out or interrupted it)",
                     ", ".join(t.ref for t in tickets), time.perf_counter() - start)
            for ticket in tickets:
                if ticket.state != "stopped":
                    self._changed(ticket, "stopped")
            return [e] * len(tickets)
        except torch.cuda.OutOfMemoryError as e:
            if alone:
                return self._failed(tickets, e)
            out_of_memory = True  # retried below, once this frame no longer holds the batch's tensors
        except Exception as e:
            return self._failed(tickets, e)
        if out_of_memory:
            return self._halves(pipe, tickets, start)
        images = images if isinstance(images, list) else [images]
        outcomes = []
        for ticket, own in zip(tickets, rows):
            if ticket.state == "stopped":
                log.info("request %s: given up while its batch ran; its images are dropped", ticket.ref)
                outcomes.append(None)
                continue
            pictures = [encode(image, ticket.job.model) for image in images[own]]
            outcomes.append(GenerationResult(pictures, time.perf_counter() - start))
            self._changed(ticket, "done")
        if self.metrics is not None:
            self.metrics.batch_done(self.name, len(images), time.perf_counter() - began)
        return outcomes

    def _failed(self, tickets: list[Ticket], error: Exception) -> list:
        for ticket in tickets:
            self._changed(ticket, "failed")
        return [error] * len(tickets)

    def _halves(self, pipe, tickets: list[Ticket], start: float) -> list:
        images = sum(t.share.images for t in tickets)
        model = tickets[0].job.model
        if self.max_batch is None:
            self.limits[model] = max(1, min(self.limits.get(model, images), images // 2))
        log.warning("%s on %s: out of memory in a batch of %d images; running it in halves", model, self.name,
                    images)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(tickets) // 2
        return self._generate(pipe, tickets[:half], start) + self._generate(pipe, tickets[half:], start)


def encode(image, model: str) -> Picture:
    """The PNG a client gets, its settings written in as `sd generate` writes them."""
    settings = image.info["sd"]
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_metadata(settings, model))
    return Picture(buf.getvalue(), settings)
