"""The bounded queue in front of one thread that runs the jobs, one at a time, and stops a job
its client gave up on within a UNet block (sd/interrupt.py).

Queue bookkeeping happens on the event loop only; the thread loads the model (timing its first
UNet call, sd/serve/speed.py), generates and encodes the PNG.
"""

import asyncio
import collections
import contextlib
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..interrupt import Interrupted, checkpoint, interruptible
from ..pngmeta import png_metadata
from . import speed
from .cache import ModelCache
from .jobs import GenerationJob, GenerationResult, Picture, RequestError

log = logging.getLogger("sd.serve")


class Ticket:
    """A job's place: its future (set on the event loop), the flag that stops it (read by the
    thread), and its progress (written by the thread after every step, read by anyone)."""
    __slots__ = ("job", "ref", "future", "stop", "state", "step", "steps", "denoised", "started")

    def __init__(self, job: GenerationJob, ref: str, future: asyncio.Future):
        self.job, self.ref, self.future, self.stop = job, ref, future, threading.Event()
        self.state = "queued"           # queued, running, done, failed, stopped
        self.step, self.steps = 0, 0    # steps done of the run's total
        self.denoised = None            # the last step's x0 prediction: latents for a preview
        self.started: float | None = None


class Worker:
    def __init__(self, cache: ModelCache, speeds: speed.Speeds, queue_size: int, measure=speed.measure):
        self.cache, self.speeds, self.queue_size, self.measure = cache, speeds, queue_size, measure
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running: Ticket | None = None
        self.closing: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Called with a ticket whenever its state or progress changes: on the event loop when it
        # is queued, then from the worker thread.
        self.listeners: list = []

    # ------------------------------------------------------------ on the event loop

    def start(self):
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

    def check_open(self):
        if self.closing:
            raise RequestError(503, f"{self.closing}; try again later")
        if len(self.waiting) + (self.running is not None) > self.queue_size:
            raise RequestError(429, f"the queue is full ({self.queue_size} waiting behind the one running); "
                                    "try again later", headers={"Retry-After": "1"})

    def submit(self, job: GenerationJob, ref: str) -> Ticket:
        self.check_open()
        if self._wakeup is None:
            raise RuntimeError("the worker is not started (run the app with its lifespan)")
        ticket = Ticket(job, ref, self._loop.create_future())
        self.waiting.append(ticket)
        self._wakeup.set()
        self._changed(ticket)
        return ticket

    def abandon(self, ticket: Ticket):
        """Its client left, timed out or interrupted it: out of the queue, or stopped at the running job's
        next checkpoint."""
        ticket.stop.set()
        with contextlib.suppress(ValueError):
            self.waiting.remove(ticket)

    def close(self, reason: str):
        """Answer every waiting job with 503 and take no new ones; the running job finishes."""
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
            ticket = self.waiting.popleft()
            self.running = ticket
            try:
                result = await self._loop.run_in_executor(self._executor, self._run, ticket)
            except asyncio.CancelledError:
                if not ticket.future.done():
                    ticket.future.set_exception(RequestError(503, "the server is shutting down"))
                raise
            except Exception as e:  # handed to the request; never ends the loop
                if not ticket.future.done() and not ticket.stop.is_set():
                    ticket.future.set_exception(e)
            else:  # a job that finished before its stop was seen still hands its result over
                if not ticket.future.done():
                    ticket.future.set_result(result)
            finally:
                self.running = None

    # ------------------------------------------------------------ in the worker thread

    def _changed(self, ticket: Ticket, state: str | None = None):
        if state is not None:
            ticket.state = state
        for listener in self.listeners:
            listener(ticket)

    def _run(self, ticket: Ticket) -> GenerationResult:
        try:
            result = self._generate(ticket)
        except Interrupted:
            self._changed(ticket, "stopped")
            raise
        except BaseException:
            self._changed(ticket, "failed")
            raise
        self._changed(ticket, "done")
        return result

    def _generate(self, ticket: Ticket) -> GenerationResult:
        job, start = ticket.job, time.perf_counter()
        if ticket.stop.is_set():
            raise Interrupted("given up before it started")
        ticket.started = time.time()
        self._changed(ticket, "running")
        pipe = self.cache.get(job.model)
        if job.model not in self.speeds.rates:
            self.speeds.rates[job.model] = self.measure(pipe)
            log.info("%s: a UNet call takes %.3g s per megapixel here", job.model, self.speeds.rates[job.model])
        self.speeds.check(job, pipe.defaults)
        def between_steps(step):
            checkpoint()  # a compiled UNet has no checkpoints inside: stop between its steps
            ticket.step, ticket.steps, ticket.denoised = step.i + 1, step.n, step.denoised
            self._changed(ticket)

        try:
            with interruptible(ticket.stop.is_set):
                images = pipe.generate(**job.kwargs, callback=between_steps)
        except Interrupted:
            log.info("request %s: stopped %.1f s into its run (its client left, timed out or interrupted it)",
                     ticket.ref, time.perf_counter() - start)
            raise
        pictures = [encode(image, job.model) for image in (images if isinstance(images, list) else [images])]
        return GenerationResult(pictures, time.perf_counter() - start)


def encode(image, model: str) -> Picture:
    """The PNG a client gets, its settings written in as `sd generate` writes them."""
    settings = image.info["sd"]
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_metadata(settings, model))
    return Picture(buf.getvalue(), settings)
