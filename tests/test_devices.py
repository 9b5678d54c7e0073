"""Several devices (issue 18, part 2): `--device cuda:0,cuda:1` (or `all`) makes one worker and model
cache per device behind one facade (sd/serve/router.py's Workers); a job goes to the worker with the
least to do, a model not loaded there counting one job more. Tested with several CPU workers
(`--device cpu,cpu`), whose pipelines are instant stand-ins (tests/worker_fixtures.py)."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.register_assert_rewrite("server_fixtures", "worker_fixtures")
from server_fixtures import wait_until  # noqa: E402
from worker_fixtures import MODEL, OTHER, AppServer, Gate, several  # noqa: E402

from sd.serve import cli  # noqa: E402
from sd.serve.cache import memory_budget  # noqa: E402
from sd.serve.jobs import GenerationJob, RequestError  # noqa: E402
from sd.serve.router import Workers, unique_names  # noqa: E402
from sd.serve.worker import Worker  # noqa: E402


def job(model=MODEL, prompt="x", **kw) -> GenerationJob:
    return GenerationJob(model, {"prompt": prompt, "num_steps": 2, **kw})


def test_the_device_flag():
    assert cli.devices_of(None) == [None]
    assert cli.devices_of("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert cli.devices_of("cpu,cpu") == ["cpu", "cpu"]
    import torch
    assert cli.devices_of("all") == ([f"cuda:{k}" for k in range(torch.cuda.device_count())] or [None])
    assert unique_names(["cpu", "cuda:0", "cpu"]) == ["cpu#0", "cuda:0", "cpu#1"]
    assert unique_names(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("flag, message", [
    ("cpu,,cpu", "--device: an empty name in the list (names are separated by single commas)"),
    ("cpu,nonsense", "--device nonsense: not usable on this machine"),
])
def test_a_bad_device_list_is_one_line_error(capsys, tmp_path, flag, message):
    assert cli.main(["--weights-dir", str(tmp_path), "--device", flag]) == 2
    assert message in capsys.readouterr().err


def test_sd_serve_makes_a_worker_and_cache_per_device(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(cli, "serve", lambda server, service: made.append(service) or 0)
    monkeypatch.setattr(cli, "_log_to_stderr", lambda: None)
    assert cli.main(["--weights-dir", str(tmp_path), "--device", "cpu,cpu", "--max-batch", "3"]) == 0
    workers = made[0].worker
    assert isinstance(workers, Workers) and [w.name for w in workers.workers] == ["cpu#0", "cpu#1"]
    first, second = workers.workers
    assert first.cache is not second.cache and made[0].cache is first.cache
    assert first.cache.max_bytes == second.cache.max_bytes == memory_budget("cpu") // 2  # they share the RAM
    assert first.max_batch == second.max_batch == 3 and first.listeners is second.listeners is workers.listeners
    assert cli.main(["--weights-dir", str(tmp_path), "--device", "cpu", "--cache-gb", "1"]) == 0
    one = made[1].worker
    assert isinstance(one, Worker) and one.max_batch is None and one.cache.max_bytes == 2 ** 30  # None: auto
    assert cli.main(["--weights-dir", str(tmp_path), "--max-batch", "0"]) == 2


def test_routing_least_to_do_a_loaded_model_counting_one_job_less(tmp_path):
    service = several(tmp_path, 2)
    workers, gate = service.worker, Gate(at=1)
    workers.listeners.append(gate)
    heard = set()
    workers.listeners.append(lambda t: heard.add(t.worker.name))

    async def main():
        workers.start()
        try:
            a = workers.submit(job(prompt="a"), "a")      # both idle, neither has the model: the first
            b = workers.submit(job(prompt="b", seed=1), "b")  # cpu#0: 1 job; cpu#1: none, but would load (1)
            c = workers.submit(job(prompt="c"), "c")      # cpu#0: 2; cpu#1: 1
            d = workers.submit(job(OTHER, prompt="d"), "d")  # cpu#0: 2 + 1; cpu#1: 1 + 1
            e = workers.submit(job(prompt="e"), "e")      # both 2, both expect the model: the first
            tickets = [a, b, c, d, e]
            assert [t.worker.name for t in tickets] == ["cpu#0", "cpu#0", "cpu#1", "cpu#1", "cpu#0"]
            assert len(workers.waiting) == 5 and workers.running is None  # none taken yet
            await gate.wait()
            assert [t.job.kwargs["prompt"] for t in workers.running_batch] == ["a", "b", "e", "c"]  # a, b, e batched
            assert workers.running is a and [t.job.kwargs["prompt"] for t in workers.waiting] == ["d"]
            gate.release()
            return tickets, await asyncio.gather(*(t.future for t in tickets))
        finally:
            gate.release()
            await workers.stop()

    tickets, results = asyncio.run(main())
    assert [r.pictures[0].settings["prompt"] for r in results] == ["a", "b", "c", "d", "e"]
    first, second = (w.cache for w in workers.workers)
    assert set(first.fakes) == {MODEL} and set(second.fakes) == {MODEL, OTHER}  # each device loaded its own
    assert heard == {"cpu#0", "cpu#1"}  # one listener list hears both devices


def test_full_and_closing_across_devices(tmp_path):
    service = several(tmp_path, 2, queue_size=0)
    workers, gate = service.worker, Gate(at=1)
    workers.listeners.append(gate)

    async def main():
        workers.start()
        try:
            first = workers.submit(job(prompt="a", num_steps=3), "a")
            second = workers.submit(job(prompt="b"), "b")  # the other device: every queue holds 0 waiting
            with pytest.raises(RequestError) as full:
                workers.submit(job(prompt="c"), "c")
            assert full.value.status == 429
            workers.abandon(second)
            await gate.wait()
            workers.close("closing for the test")
            with pytest.raises(RequestError) as closing:
                workers.check_open()
            assert closing.value.status == 503 and "closing for the test" in str(closing.value)
            gate.release()
            return await first.future, second
        finally:
            gate.release()
            await workers.stop()

    result, second = asyncio.run(main())
    assert result.pictures[0].settings["prompt"] == "a" and second.stop.is_set()


def test_healthz_reports_each_device_and_requests_spread_over_them(tmp_path):
    service = several(tmp_path, 2)
    server, gate = AppServer(service), Gate(at=1, only=lambda t: t.job.kwargs["prompt"] == "held")
    service.worker.listeners.append(gate)
    url = f"{server.url}/ai/run/{MODEL}"
    body = {"width": 256, "height": 256, "num_steps": 2}
    try:
        with ThreadPoolExecutor(3) as pool:
            held = pool.submit(httpx.post, url, json={**body, "prompt": "held"}, timeout=30)
            asyncio.run(gate.wait())
            queued = pool.submit(httpx.post, url, json={**body, "prompt": "queued"}, timeout=30)  # behind it: loaded
            wait_until(lambda: len(service.worker.workers[0].waiting) == 1, "queued on cpu#0")
            other = httpx.post(url, json={**body, "prompt": "other"}, timeout=30)  # cpu#0 has two: cpu#1 loads it
            health = httpx.get(server.url + "/healthz").json()
            gate.release()
            assert held.result().status_code == queued.result().status_code == other.status_code == 200
        assert health["device"] == "cpu#0,cpu#1" and health["queue_size"] == 64 and health["queue"] == 1
        assert [(d["device"], d["running"], d["queue"], d["loaded"]) for d in health["devices"]] == [
            ("cpu#0", MODEL, 1, [MODEL]), ("cpu#1", None, 0, [MODEL])]
        assert health["loaded"] == [MODEL] and health["models"][MODEL] == "loaded" and health["running"] == MODEL
        assert [w.cache.fakes[MODEL].calls for w in service.worker.workers] == [[1, 1], [1]]
    finally:
        gate.release()
        server.stop()
