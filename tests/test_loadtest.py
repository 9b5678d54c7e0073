"""scripts/loadtest.py (issue 18, part 5), in the default suite as a smoke form: its clients against
an in-process server of instant stand-in pipelines for half a second, its numbers, its table row
and its plot. The measurement itself (minutes) is docs/SERVING.md's."""

import asyncio
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("worker_fixtures")
from worker_fixtures import MODEL, AppServer, several  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import loadtest  # noqa: E402


def test_clients_against_a_server(tmp_path):
    service = several(tmp_path, 1, max_batch=4)
    server = AppServer(service)
    try:
        body = {"prompt": "x", "width": 256, "height": 256, "num_steps": 2, "seed": 100}
        run = asyncio.run(loadtest.load(f"{server.url}/ai/run/{MODEL}", body, 3, 0.5, {}, 30, "4"))
    finally:
        server.stop()
    assert run.requests >= 3 and run.images == run.requests and run.errors == 0
    assert run.statuses == {"200": run.requests}
    assert run.seconds >= 0.5 and run.images_per_second == pytest.approx(run.images / run.seconds)
    assert 0 < run.p50 <= run.p95 <= run.p99
    calls = service.worker.workers[0].cache.fakes[MODEL].calls
    assert sum(calls) == run.requests  # every request made its image


def test_numbers_and_row():
    answers = [(1.0, 200), (2.0, 200), (3.0, 500), (4.0, 0)]
    run = loadtest.summarize("auto", 4, 10.0, answers, per_request=2)
    assert (run.requests, run.images, run.errors, run.images_per_second) == (4, 4, 2, 0.4)
    assert run.p50 == 2.5 and run.p99 == pytest.approx(3.97)  # linear between the nearest ranks
    assert run.statuses == {"200": 2, "500": 1, "0": 1}
    assert loadtest.row(run) == "| auto | 4 | 4 | 0.40 | 2.50 | 3.85 | 3.97 | 2 (500: 1, 0: 1) |"
    assert [loadtest.images_of(b) for b in ({"batch_size": 2, "n_iter": 3}, {"n": 4}, {"num_images": 5}, {})] == \
        [6, 4, 5, 1]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [loadtest.summarize(m, c, 1.0, [(0.1 * c, 200)] * c, 1) for m in ("1", "auto") for c in (1, 2, 4)]
    loadtest.plot(runs, tmp_path / "plot.png", "test")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
