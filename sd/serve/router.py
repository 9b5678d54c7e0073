"""Several devices: one Worker (queue, thread, model cache) per device behind the interface of one,
so that the app and the dialects need not know how many there are.

Routing: a job goes to the open worker with the least to do, counting a model that is not loaded
there (nor queued to be) as one job more: loading costs about a job's time, so a worker that has
the model wins ties and a lead of one, and a worker without it takes over once the others are two
jobs busier. (Always preferring the worker that has the model would leave the other devices idle
under a stream of one model's jobs.) Ties go to the first device named.
"""

from .jobs import GenerationJob
from .worker import Ticket, Worker

LOAD_COST = 1  # jobs a model load is worth when routing


def unique_names(devices: list[str]) -> list[str]:
    """The devices' names, a device named more than once numbered (`cpu#0`, `cpu#1`)."""
    return [f"{d}#{devices[:k].count(d)}" if devices.count(d) > 1 else d for k, d in enumerate(devices)]


def pick(workers: list[Worker], model: str) -> Worker:
    """The worker a job of `model` goes to, among those that can take it (RequestError if none)."""
    open_ = [w for w in workers if not w.closing and not w.full]
    if not open_:
        workers[0].check_open()  # 503 while closing, else 429: every queue is full
        raise AssertionError("a worker refused nothing yet none is open")
    def cost(worker):
        load = 0 if worker.expects(model) else LOAD_COST
        return worker.backlog + load, load  # a tie goes to the worker that has the model
    return min(open_, key=cost)


class Workers:
    """Worker's interface over several workers: submit routes (pick), the rest reaches all of them;
    `listeners` is one list that every worker calls."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.listeners: list = []
        for worker in workers:
            worker.listeners = self.listeners

    def start(self):
        for worker in self.workers:
            worker.start()

    async def stop(self):
        for worker in self.workers:
            await worker.stop()

    @property
    def closing(self) -> str | None:
        return self.workers[0].closing

    @property
    def queue_size(self) -> int:
        return sum(w.queue_size for w in self.workers)

    @property
    def waiting(self) -> list[Ticket]:
        return [t for w in self.workers for t in w.waiting]

    @property
    def running(self) -> Ticket | None:
        return next((w.running for w in self.workers if w.running is not None), None)

    @property
    def running_batch(self) -> list[Ticket]:
        return [t for w in self.workers for t in w.running_batch]

    def check_open(self):
        pick(self.workers, "")

    def submit(self, job: GenerationJob, ref: str) -> Ticket:
        return pick(self.workers, job.model).submit(job, ref)

    def abandon(self, ticket: Ticket):
        for worker in self.workers:  # only its own queue holds it; the others find nothing to remove
            worker.abandon(ticket)

    def interrupt(self):
        for worker in self.workers:
            worker.interrupt()

    def close(self, reason: str):
        for worker in self.workers:
            worker.close(reason)

    def close_from_any_thread(self, reason: str):
        for worker in self.workers:
            worker.close_from_any_thread(reason)
