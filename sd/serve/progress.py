"""Jobs that clients follow (sd's JSON dialect, sd/serve/native.py): each one's state, queue
position, steps and preview, sent as Server-Sent Events while it changes and readable as JSON; and
cancelling one.

Events, in order: `queued` {position} (again whenever it moves up), `running` (the worker took it;
the model may still be loading), `progress` {step, steps, preview} after every step, then one of
`done` {images: [settings]}, `failed` {status, errors} (the generate request's own answer), or
`stopped` {step, steps} (cancelled). Each event's data is JSON with the job's id in `job`.

The worker tells its listeners of every change (sd/serve/worker.py): on the event loop when a job
is queued, from its own thread after every step. The preview is made there, in the worker thread,
and only for a job someone follows: the x0 latents mapped to RGB by one 4x3 matrix (sd/preview.py),
not the VAE. Everything else happens on the event loop, and each follower has a queue of its own.
"""

import asyncio
import base64
import collections
import io
import json
import logging
import time

from .jobs import GenerationResult, RequestError

log = logging.getLogger("sd.serve")

TERMINAL = ("done", "failed", "stopped")
KEEP_FINISHED = 100     # finished jobs whose state can still be read, newest first
FOLLOWER_QUEUE = 1000   # events a follower may fall behind by; past that its progress events are dropped
CLAIM_WAIT = 30.0       # seconds a stream for an id that names no job waits for the job's POST
TICK = 1.0              # an idle stream's check: is the server shutting down, is a keep-alive due
KEEPALIVE = 15          # ticks between comment lines, which keep proxies from closing an idle stream
PREVIEW_SIDE = 128      # the largest side of one image's preview


class Followed:
    """One job as its followers see it."""

    def __init__(self, job_id: str):
        self.id = job_id
        self.ref: str | None = None      # its generate request's id (the worker's ticket.ref); None: no POST yet
        self.model: str | None = None
        self.state = "waiting"           # for its generate request, or while that is read and checked; then
        #                                  queued, running, and one of TERMINAL
        self.position = 0                # 1 = next to run
        self.step, self.steps, self.preview = 0, 0, None
        self.cancelled = False
        self.last: tuple[str, dict] | None = None   # the terminal event
        self.since = time.monotonic()
        self.followers: set[asyncio.Queue] = set()

    def snapshot(self) -> dict:
        """GET /v1/sd/jobs/{id}."""
        state = {"job": self.id, "state": self.state, "model": self.model, "cancelled": self.cancelled}
        if self.state == "queued":
            state["position"] = self.position
        if self.steps:
            state.update(step=self.step, steps=self.steps)
        if self.last:
            state.update({k: v for k, v in self.last[1].items() if k != "job"})
        return state

    def replay(self) -> list[tuple[str, dict]]:
        """What a follower that comes late is told first: where the job is now."""
        if self.last:
            return [self.last]
        events = []
        if self.state == "queued":
            events.append(("queued", {"job": self.id, "position": self.position}))
        if self.state == "running":
            events.append(("running", {"job": self.id, "model": self.model}))
            if self.steps:
                events.append(self._progress())
        return events

    def _progress(self) -> tuple[str, dict]:
        return "progress", {"job": self.id, "step": self.step, "steps": self.steps, "preview": self.preview}


def sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class Tracker:
    """The followed jobs of one server, by job id."""

    def __init__(self, worker):
        self.worker = worker  # a Worker, or a router's Workers (sd/serve/router.py)
        self.loop = asyncio.get_running_loop()
        self.jobs: dict[str, Followed] = {}
        self.live: dict[str, Followed] = {}   # by request id: jobs whose POST is under way
        self.finished: collections.OrderedDict[str, Followed] = collections.OrderedDict()
        worker.listeners.append(self.on_ticket)

    # ------------------------------------------------------------ from the generate request

    def claim(self, job_id: str, ref: str) -> Followed:
        """The job `job_id` for the generate request `ref`: a new one, or the one a follower is
        already waiting on; a 409 while another request's job of that id is under way."""
        job = self.jobs.get(job_id)
        if job is not None and job.ref is not None and job.state not in TERMINAL:
            raise RequestError(409, f"x-job-id: {job_id!r} names a job that is still {job.state}; choose another id")
        if job is None or job.ref is not None:
            job = self.jobs[job_id] = Followed(job_id)
            self.finished.pop(job_id, None)
        job.ref = ref
        self.live[ref] = job
        return job

    def done(self, job: Followed, result: GenerationResult):
        self._finish(job, "done", {"images": [p.settings for p in result.pictures],
                                   "seconds": round(result.seconds, 3)})

    def failed(self, job: Followed, status: int, errors: list[dict]):
        if job.cancelled and job.state == "running":
            return  # the cancel's own answer to the request; `stopped` comes when the worker lets go of it
        self._finish(job, "failed", {"status": status, "errors": errors})

    # ------------------------------------------------------------ from the worker

    def on_ticket(self, ticket):
        """The worker's listener: any thread. The preview is made here, in the worker's thread."""
        job = self.live.get(ticket.ref)
        if job is None:
            return
        preview = None
        if ticket.state == "running" and ticket.denoised is not None and job.followers:
            try:
                preview = self._preview(ticket)
            except Exception:  # a preview is never worth a job
                log.exception("request %s: no preview", ticket.ref)
        # a job is queued on the event loop (Worker.submit), where it has just been put last in its worker's queue
        place = len(ticket.worker.waiting) if ticket.state == "queued" else 0
        try:
            self.loop.call_soon_threadsafe(self._changed, job, ticket, ticket.state, ticket.step, ticket.steps,
                                           preview, place)
        except RuntimeError:  # the loop is closed: nobody is following any more
            pass

    def _preview(self, ticket) -> str:
        """The x0 latents as small pictures side by side, one per image, as a base64 PNG."""
        from PIL import Image

        from ..preview import preview
        pictures = preview(ticket.worker.cache.get(ticket.job.model), ticket.denoised)  # loaded: it runs
        for p in pictures:
            p.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        strip = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)))
        for k, p in enumerate(pictures):
            strip.paste(p, (sum(q.width for q in pictures[:k]), 0))
        buf = io.BytesIO()
        strip.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def _changed(self, job: Followed, ticket, state: str, step: int, steps: int, preview: str | None, place: int):
        if job.state in TERMINAL:
            return
        job.model = ticket.job.model
        if state in TERMINAL:  # the worker let go of it; its request's reply says how it went, unless cancelled
            if job.cancelled:
                self._finish(job, "stopped", {"step": job.step, "steps": job.steps})
        elif state == "queued":
            if job.cancelled:  # cancelled while its request was still being read
                self._stop(job, ticket)
            else:
                job.state, job.position = "queued", place
                self._publish(job, "queued", {"job": job.id, "position": place})
        elif job.state != "running":
            job.state = "running"
            self._publish(job, "running", {"job": job.id, "model": job.model})
            self._positions()
        if state == "running" and steps:
            job.step, job.steps, job.preview = step, steps, preview or job.preview
            self._publish(job, *job._progress())

    def _positions(self):
        """Tell each queued job followed here where it stands in its device's queue, if that changed."""
        for worker in getattr(self.worker, "workers", [self.worker]):  # a router's devices, or the one
            for place, ticket in enumerate(worker.waiting, 1):
                job = self.live.get(ticket.ref)
                if job is not None and job.state == "queued" and job.position != place:
                    job.position = place
                    self._publish(job, "queued", {"job": job.id, "position": place})

    # ------------------------------------------------------------ cancelling

    def cancel(self, job: Followed) -> dict:
        """Stop the job: out of the queue now, or at the running job's next step (`stopped` follows).
        A job that has finished stays as it is."""
        if job.state not in TERMINAL and not job.cancelled:
            job.cancelled = True
            ticket = next((t for t in (*self.worker.waiting, *self.worker.running_batch) if t.ref == job.ref), None)
            if ticket is not None:
                self._stop(job, ticket)
        return job.snapshot()

    def _stop(self, job: Followed, ticket):
        self.worker.abandon(ticket)
        if not ticket.future.done():  # its request is answered now, not when the worker gets to it
            ticket.future.set_exception(RequestError(409, f"job {job.id}: cancelled (POST /v1/sd/jobs/{job.id}/cancel)"))
        if ticket.state == "queued":
            self._finish(job, "stopped", {"step": 0, "steps": 0})

    # ------------------------------------------------------------ the events

    def _publish(self, job: Followed, name: str, data: dict):
        for queue in job.followers:
            if queue.full():
                if name == "progress":
                    continue  # a follower this far behind sees the later steps
                queue.get_nowait()
            queue.put_nowait((name, data))

    def _finish(self, job: Followed, name: str, data: dict):
        if job.state in TERMINAL:
            return
        job.state, job.last = name, (name, {"job": job.id, **data})
        self._publish(job, *job.last)
        self.live.pop(job.ref, None)
        self.finished[job.id] = job
        while len(self.finished) > KEEP_FINISHED:
            old_id, old = self.finished.popitem(last=False)
            if self.jobs.get(old_id) is old:
                del self.jobs[old_id]
        self._positions()

    def follow(self, job_id: str) -> "EventStream":
        """A follower of the job, registered now, before any byte of its response goes out (so a
        client that has the response's headers may send the generate request and miss nothing),
        with where the job is now queued as its first events. An id that names no job yet makes a
        job for it that a generate request may claim within CLAIM_WAIT seconds."""
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = Followed(job_id)
        queue: asyncio.Queue = asyncio.Queue(FOLLOWER_QUEUE)
        for event in job.replay():
            queue.put_nowait(event)
        job.followers.add(queue)
        return EventStream(self, job, queue)

    def unfollow(self, job: Followed, queue: asyncio.Queue):
        job.followers.discard(queue)
        if job.ref is None and not job.followers and self.jobs.get(job.id) is job:
            del self.jobs[job.id]  # nobody claimed it and nobody waits for it

    async def events(self, job: Followed, queue: asyncio.Queue):
        """The follower's events as SSE bytes, to the job's last. A job no request has claimed
        ends with `failed` after CLAIM_WAIT seconds, or when the server shuts down."""
        ticks = 0
        while True:
            try:
                name, data = await asyncio.wait_for(queue.get(), TICK)
            except asyncio.TimeoutError:
                ticks += 1
                if job.ref is None and (self.worker.closing or time.monotonic() - job.since > CLAIM_WAIT):
                    status, why = ((503, f"{self.worker.closing}") if self.worker.closing else
                                   (404, f"no generate request named it within {CLAIM_WAIT:g} s"))
                    yield sse("failed", {"job": job.id, "status": status,
                                         "errors": [{"field": None, "message": f"job {job.id}: {why}"}]})
                    return
                if ticks % KEEPALIVE == 0:
                    yield b": keep-alive\n\n"
                continue
            yield sse(name, data)
            if name in TERMINAL:
                return

    def following(self) -> int:
        """Open event streams (for tests and health checks)."""
        return sum(len(job.followers) for job in self.jobs.values())


class EventStream:
    """The ASGI response of GET /v1/sd/jobs/{id}/events: its follower is dropped however the
    response ends: the last event sent, the client gone (Starlette then cancels the stream), or
    never started at all."""

    def __init__(self, tracker: Tracker, job: Followed, queue: asyncio.Queue):
        self.tracker, self.job, self.queue = tracker, job, queue

    async def __call__(self, scope, receive, send):
        from starlette.responses import StreamingResponse
        try:
            stream = StreamingResponse(self.tracker.events(self.job, self.queue), media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await stream(scope, receive, send)
        finally:
            self.tracker.unfollow(self.job, self.queue)
