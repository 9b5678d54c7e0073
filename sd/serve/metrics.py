"""GET /metrics: the server's counters in the Prometheus text format (prometheus-client, the
server extra), one registry per app.

    sd_requests_total{route,status}        requests answered, by route template ("-": no route)
    sd_queue_length{device}                jobs waiting
    sd_running_jobs{device}                jobs in the running batch
    sd_batch_size{device}                  histogram: images per UNet batch
    sd_generation_seconds{device}          histogram: a batch's generate call and PNG encoding
    sd_step_seconds{device}                histogram: one sampler step of a batch (the first step,
                                           which also encodes the prompts, is left out)
    sd_images_total{device}                images made
    sd_images_per_second{device}           images made over the last RATE_WINDOW seconds, per second
                                           (rate(sd_images_total[1m]) says the same in PromQL)
    sd_models_loaded{device}               models in the device's cache
    sd_device_memory_bytes{device,kind}    weights: the cache's models; on CUDA also allocated and
                                           reserved (PyTorch's allocator) and total; elsewhere total RAM

Requests are counted by the access log (sd/serve/app.py), batches and steps by the workers (from
their threads: prometheus-client's metrics take their own locks); the rest is read when scraped.
"""

import collections
import os
import threading
import time

import torch

RATE_WINDOW = 60.0
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, workers: list, clock=time.monotonic):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.workers, self.clock = workers, clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sd_requests", "HTTP requests answered, by route template and status",
                                ["route", "status"], registry=r)
        self.batch_size = Histogram("sd_batch_size", "Images per UNet batch", ["device"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.generation = Histogram("sd_generation_seconds", "Seconds of a batch's generate call and PNG encoding",
                                    ["device"], buckets=SECONDS_BUCKETS, registry=r)
        self.step = Histogram("sd_step_seconds", "Seconds of one sampler step of a batch (not the first)",
                              ["device"], buckets=STEP_BUCKETS, registry=r)
        self.images = Counter("sd_images", "Images made", ["device"], registry=r)
        self._recent: dict[str, collections.deque] = {w.name: collections.deque() for w in workers}
        self._lock = threading.Lock()
        for worker in workers:  # the labelled series exist, at 0, before the first batch
            for family in (self.batch_size, self.generation, self.step, self.images):
                family.labels(worker.name)
            worker.metrics = self
        r.register(_Live(self))

    # ------------------------------------------------------------ told

    def request_done(self, route: str, status: int):
        self.requests.labels(route, str(status)).inc()

    def batch_done(self, device: str, images: int, seconds: float):
        self.batch_size.labels(device).observe(images)
        self.generation.labels(device).observe(seconds)
        self.images.labels(device).inc(images)
        with self._lock:
            self._recent[device].append((self.clock(), images))

    def step_done(self, device: str, seconds: float):
        self.step.labels(device).observe(seconds)

    def images_per_second(self, device: str) -> float:
        now = self.clock()
        with self._lock:
            recent = self._recent[device]
            while recent and recent[0][0] < now - RATE_WINDOW:
                recent.popleft()
            return sum(n for _, n in recent) / RATE_WINDOW

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class _Live:
    """What is read when scraped."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    @staticmethod
    def describe():
        """The families, empty (the registry checks their names against the others' when registering)."""
        from prometheus_client.core import GaugeMetricFamily
        return {name: GaugeMetricFamily(name, text, labels=labels) for name, text, labels in (
            ("sd_queue_length", "Jobs waiting", ["device"]),
            ("sd_running_jobs", "Jobs in the running batch", ["device"]),
            ("sd_images_per_second", f"Images made over the last {RATE_WINDOW:g} s, per second", ["device"]),
            ("sd_models_loaded", "Models in the device's cache", ["device"]),
            ("sd_device_memory_bytes", "Device memory: weights (the cache's models), allocated and reserved "
                                       "(PyTorch's CUDA allocator), total", ["device", "kind"]))}.values()

    def collect(self):
        gauges = {family.name: family for family in self.describe()}
        for worker in self.metrics.workers:
            name = worker.name
            gauges["sd_queue_length"].add_metric([name], len(worker.waiting))
            gauges["sd_running_jobs"].add_metric([name], len(worker.running_batch))
            gauges["sd_images_per_second"].add_metric([name], self.metrics.images_per_second(name))
            gauges["sd_models_loaded"].add_metric([name], len(worker.cache.loaded))
            for kind, value in memory(worker.cache).items():
                gauges["sd_device_memory_bytes"].add_metric([name, kind], value)
        yield from gauges.values()


def memory(cache) -> dict[str, int]:
    device = torch.device(cache.device)
    found = {"weights": cache.held_bytes}
    if device.type == "cuda":
        found.update(allocated=torch.cuda.memory_allocated(device), reserved=torch.cuda.memory_reserved(device),
                     total=torch.cuda.get_device_properties(device).total_memory)
    else:
        found["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return found
