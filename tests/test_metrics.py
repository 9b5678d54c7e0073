"""GET /metrics (issue 18, part 3): the Prometheus text format, read back with prometheus-client's own
parser; every number checked against what the test made happen (requests, statuses, batches,
steps, images, the queue while a batch is held)."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.register_assert_rewrite("server_fixtures", "worker_fixtures")
from server_fixtures import wait_until  # noqa: E402
from worker_fixtures import MODEL, AppServer, Gate, several  # noqa: E402

from sd.serve.metrics import RATE_WINDOW, Metrics  # noqa: E402

ROUTE = "/ai/run/{model:path}"
BODY = {"width": 256, "height": 256, "num_steps": 2}


def scrape(server, **kw) -> dict:
    """{(sample name, frozenset of labels): value}, through the Prometheus parser; each family typed."""
    r = httpx.get(server.url + "/metrics", timeout=30, **kw)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        assert family.type in ("counter", "gauge", "histogram") and family.documentation, family.name
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples, name, **labels):
    return samples[name, frozenset(labels.items())]


def buckets(samples, name, **labels) -> dict[str, float]:
    found = {dict(k)["le"]: v for (n, k), v in samples.items() if n == name + "_bucket"
             and {k: v for k, v in dict(k).items() if k != "le"} == labels}
    counts = list(found.values())
    assert counts == sorted(counts) and found["+Inf"] == value(samples, name + "_count", **labels)
    return found


def test_metrics_count_what_happened(tmp_path):
    service = several(tmp_path, 1, max_batch=4)
    server, gate = AppServer(service), Gate(at=1, only=lambda t: t.job.kwargs["prompt"] == "held")
    service.worker.listeners.append(gate)
    url = f"{server.url}/ai/run/{MODEL}"
    try:
        before = scrape(server)  # every device's series exist before any batch
        assert value(before, "sd_batch_size_count", device="cpu") == 0
        assert value(before, "sd_images_total", device="cpu") == 0
        with ThreadPoolExecutor(4) as pool:
            held = pool.submit(httpx.post, url, json={**BODY, "prompt": "held"}, timeout=30)
            asyncio.run(gate.wait())
            queued = [pool.submit(httpx.post, url, json={**BODY, "prompt": f"p{k}", "seed": k}, timeout=30)
                      for k in range(3)]
            wait_until(lambda: len(service.worker.waiting) == 3, "three queued")
            during = scrape(server)
            gate.release()
            assert [f.result().status_code for f in [held, *queued]] == [200] * 4
        assert httpx.post(url, content=json.dumps({**BODY, "prompt": "x", "width": 7}), timeout=30).status_code == 400
        assert httpx.get(server.url + "/no/such/route").status_code == 404
        after = scrape(server)
    finally:
        gate.release()
        server.stop()

    assert value(during, "sd_queue_length", device="cpu") == 3 and value(during, "sd_running_jobs", device="cpu") == 1
    assert value(after, "sd_queue_length", device="cpu") == 0 and value(after, "sd_running_jobs", device="cpu") == 0
    assert value(after, "sd_requests_total", route=ROUTE, status="200") == 4
    assert value(after, "sd_requests_total", route=ROUTE, status="400") == 1
    assert value(after, "sd_requests_total", route="-", status="404") == 1
    assert value(after, "sd_requests_total", route="/metrics", status="200") == 2  # the scrapes before this one
    # two batches: the held job alone, then the three queued behind it together
    assert value(after, "sd_batch_size_count", device="cpu") == 2
    assert value(after, "sd_batch_size_sum", device="cpu") == 4
    sizes = buckets(after, "sd_batch_size", device="cpu")
    assert (sizes["1.0"], sizes["2.0"], sizes["3.0"]) == (1, 1, 2)
    assert value(after, "sd_images_total", device="cpu") == 4
    assert buckets(after, "sd_generation_seconds", device="cpu")["+Inf"] == 2
    assert buckets(after, "sd_step_seconds", device="cpu")["+Inf"] == 2  # two steps a batch, the first not timed
    assert value(after, "sd_images_per_second", device="cpu") == pytest.approx(4 / RATE_WINDOW)
    assert value(after, "sd_models_loaded", device="cpu") == 1
    assert value(after, "sd_device_memory_bytes", device="cpu", kind="weights") == 0  # the stand-in has none
    assert value(after, "sd_device_memory_bytes", device="cpu", kind="total") > 2 ** 20


def test_every_device_has_its_series_and_the_token_guards_them(tmp_path):
    service = several(tmp_path, 2, api_token="secret")
    server = AppServer(service)
    try:
        assert httpx.get(server.url + "/metrics").status_code == 401
        samples = scrape(server, headers={"Authorization": "Bearer secret"})
    finally:
        server.stop()
    for device in ("cpu#0", "cpu#1"):
        assert value(samples, "sd_queue_length", device=device) == 0
        assert value(samples, "sd_models_loaded", device=device) == 0
    assert value(samples, "sd_requests_total", route="/metrics", status="401") == 1


def test_images_per_second_is_over_the_last_window():
    now = [1000.0]
    worker = type("W", (), {"name": "cpu", "metrics": None})()
    metrics = Metrics([worker], clock=lambda: now[0])
    metrics.batch_done("cpu", 6, 1.0)
    now[0] += RATE_WINDOW / 2
    metrics.batch_done("cpu", 3, 1.0)
    assert metrics.images_per_second("cpu") == pytest.approx(9 / RATE_WINDOW)
    now[0] += RATE_WINDOW / 2 + 1  # the first batch has left the window
    assert metrics.images_per_second("cpu") == pytest.approx(3 / RATE_WINDOW)
    assert worker.metrics is metrics
