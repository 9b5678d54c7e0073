"""`sd serve`'s limits, in process (tests/server_fixtures.py: InProcessServer), where the test
decides when a job ends (FakePipeline) and what the device measures: a job stops when its client
leaves or its time is up, a hopeless job is refused up front, queued jobs keep their order and
their bounds, and slow or numerous connections are cut. Every wait is on a state or an event."""

import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import InProcessServer, LogWatch, fake_cache, wait_until  # noqa: E402

import sd  # noqa: E402
from sd.defaults import Defaults  # noqa: E402
from sd.serve.jobs import GenerationJob  # noqa: E402
from sd.serve.speed import REFUSE_FACTOR, Speeds, TooSlow, measure, work_of  # noqa: E402
from sd.tiny import CHECKPOINT  # noqa: E402

MODEL = "@cf/runwayml/stable-diffusion-v1-5-img2img"
SMALL = {"prompt": "x", "width": 256, "height": 256, "num_steps": 2}


@pytest.fixture
def log():
    watch = LogWatch()
    yield watch
    watch.detach()


@pytest.fixture
def start(tmp_path):
    """start(release=False, **limits) -> (server, cache): jobs block until cache.fakes[...].release."""
    servers = []

    def start(release=True, **limits):
        cache = fake_cache(tmp_path, release=release)
        servers.append((InProcessServer(cache, **limits), cache))
        return servers[-1]
    yield start
    for server, cache in servers:
        for fake in cache.fakes.values():
            fake.release.set()
        server.stop()


def post(server, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/ai/run/{MODEL}", json=body, timeout=kw.pop("timeout", 60), **kw)


def running(server):
    return server.health()["running"] is not None


# ---------------------------------------------------------------- a job that is given up stops


def test_timeout_504_stops_the_job(start, log):
    server, cache = start(release=False, timeout=1)
    r = post(server, SMALL)
    assert r.status_code == 504 and "timed out after 1 s" in r.json()["errors"][0]["message"]
    assert cache.fakes[MODEL].stopped.wait(60)  # stopped where it ran (a checkpoint), not finished
    log.wait_for("stopped")
    wait_until(lambda: not running(server), "idle")
    cache.fakes[MODEL].release.set()
    assert post(server, SMALL).status_code == 200  # the worker is free again


def test_a_client_that_leaves_stops_its_running_job(start, log):
    server, cache = start(release=False)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        body = json.dumps(SMALL).encode()
        s.sendall(f"POST /ai/run/{MODEL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: running(server), "running")
    assert cache.fakes[MODEL].stopped.wait(60)
    line = log.wait_for("status=499")
    assert f"model={MODEL}" in line and "size=256x256 steps=2" in line
    wait_until(lambda: not running(server), "idle")


def test_a_client_that_gives_up_loses_its_place(start, log):
    server, cache = start(release=False)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, server, {**SMALL, "prompt": "first"})
        wait_until(lambda: MODEL in cache.fakes and cache.fakes[MODEL].started.is_set(), "running")
        with socket.create_connection(("127.0.0.1", server.port)) as s:  # the second waits behind it, then leaves
            body = json.dumps({**SMALL, "prompt": "second"}).encode()
            s.sendall(f"POST /ai/run/{MODEL} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                      + body)
            wait_until(lambda: server.health()["queue"] == 1, "queued")
        wait_until(lambda: server.health()["queue"] == 0, "out of the queue")
        log.wait_for("status=499")
        cache.fakes[MODEL].release.set()
        assert first.result().status_code == 200
    assert cache.fakes[MODEL].prompts == ["first"]  # the abandoned one never ran


def test_a_burst_past_the_queue_gets_429(start):
    server, cache = start(release=False, queue_size=1)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, server, SMALL)
        wait_until(lambda: MODEL in cache.fakes and cache.fakes[MODEL].started.is_set(), "running")
        second = pool.submit(post, server, SMALL)
        wait_until(lambda: server.health()["queue"] == 1, "queued")
        refused = list(pool.map(lambda _: post(server, SMALL), range(6)))
        cache.fakes[MODEL].release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    for r in refused:
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["errors"] == [{"code": 3040, "message": "the queue is full (1 waiting behind the one "
                                                                "running); try again later"}]


# ---------------------------------------------------------------- a hopeless job is refused


def test_the_speed_model_on_a_fake_clock():
    """One UNet call timed at half the native side: 3 s on the fake clock at 256x256 (tiny model:
    native 64, so the 8x8-latent floor) -> 3 s / 0.0041 MP; a job's time scales by pixels and calls."""
    pipe = sd.load(CHECKPOINT, device="cpu")
    ticks = iter([10.0, 13.0])
    rate = measure(pipe, clock=lambda: next(ticks))
    assert rate == pytest.approx(3.0 / (64 * 64 / 1e6))
    defaults = Defaults(width=512, height=512, num_steps=20, guidance=7.5)
    job = GenerationJob(MODEL, {"prompt": "x", "width": 1024, "height": 512, "num_steps": 10})
    work = work_of(job, defaults)
    assert (work.width, work.height, work.steps, work.calls) == (1024, 512, 10, 20)  # CFG: 2 calls a step
    assert work_of(GenerationJob(MODEL, {"prompt": "x", "guidance": 1.0}), defaults).calls == 20
    assert work_of(GenerationJob(MODEL, {"prompt": "x", "image": b"png", "strength": 0.5}), defaults).steps == 10
    speeds = Speeds(timeout=60, device="cpu")
    assert speeds.estimate(job, defaults) is None  # not measured yet: not refused
    speeds.rates[MODEL] = 1.0  # s per megapixel per call
    assert speeds.estimate(job, defaults) == pytest.approx(1024 * 512 / 1e6 * 20)
    speeds.check(job, defaults)  # 10.5 s: fine
    big = GenerationJob(MODEL, {"prompt": "x", "width": 2048, "height": 2048, "num_steps": 20})
    assert speeds.estimate(big, defaults) > REFUSE_FACTOR * 60
    with pytest.raises(TooSlow, match=r"2048x2048 at 20 steps would take about 168 s .* time limit of 60 s "
                                      r"\(--timeout\); at most about 1216x1216 fits"):
        speeds.check(big, defaults)
    Speeds(timeout=None).check(big, defaults)  # no timeout, no refusal


def test_a_job_expected_far_past_the_timeout_is_refused_up_front(start):
    """The device measures 10 s per megapixel per UNet call (a fake measurement): with a 60 s
    timeout a 256x256, 2-step job (about 5 s) runs and a 2048x2048 one (about 1700 s) is refused,
    by the worker when it is the model's first job, at the door once the model is measured."""
    server, cache = start(timeout=60, measure=lambda pipe: 10.0)
    big = {"prompt": "x", "width": 2048, "height": 2048, "num_steps": 20}
    for _ in range(2):  # first: measured in the worker, then refused there; then refused before queueing
        r = post(server, big)
        assert r.status_code == 422, r.text
        message = r.json()["errors"][0]["message"]
        assert message.startswith("width x height: 2048x2048 at 20 steps would take about 1678 s on this "
                                  "server's cpu, far past its time limit of 60 s (--timeout)")
        assert r.json()["errors"][0]["code"] == 5422
    assert cache.fakes[MODEL].prompts == []
    assert post(server, SMALL).status_code == 200


# ---------------------------------------------------------------- slow and numerous connections


def read_until_closed(s: socket.socket, trickle: bytes = b"", seconds: float = 60) -> bytes:
    """What the server sends until it closes, while sending `trickle` one byte at a time (a
    slow client). `seconds` only guards against a hang."""
    reply, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        readable, _, _ = select.select([s], [], [], 0.1)
        if readable:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return reply
            if not chunk:
                return reply
            reply += chunk
        elif trickle:
            try:
                s.sendall(trickle[:1])
            except (BrokenPipeError, ConnectionResetError):
                continue  # closed on its side; read what it sent
            trickle = trickle[1:] or b" "
    raise AssertionError(f"the server kept the connection open for {seconds} s")


def test_slow_headers_get_408_and_a_close(start):
    server, _ = start(read_timeout=1)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /ai/run/x HTTP/1.1\r\nHo")
        reply = read_until_closed(s, trickle=b"st: x\r\nX-Padding: " + b"a" * 1000)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request headers: not received within 1 s" in reply
    # and a keep-alive connection's next request gets the same deadline
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
        reply = read_until_closed(s, trickle=b"st: x\r\nX-Padding: " + b"a" * 1000)
    assert reply.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in reply


def test_a_slow_body_gets_408_and_a_close(start):
    server, _ = start(read_timeout=1)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /ai/run/{MODEL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 1040\r\n\r\n{{\"prompt\":".encode())
        reply = read_until_closed(s, trickle=b" " * 1030)
    # a close is answer enough; if the 408 got through first, it says why
    assert reply == b"" or (reply.startswith(b"HTTP/1.1 408 ") and b"body: " in reply), reply[:300]
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_hundreds_of_stalled_connections_are_cut(start):
    """300 connections that sent their headers and `{"prompt":` and then nothing: those past
    --max-connections are refused at once, the rest cut at --read-timeout; then all is well."""
    server, _ = start(read_timeout=1, max_connections=32)
    head = (f"POST /ai/run/{MODEL} HTTP/1.1\r\nHost: x\r\nContent-Length: 1040\r\n\r\n{{\"prompt\":").encode()
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        for s in sockets:
            s.sendall(head)
        replies = [read_until_closed(s) for s in sockets]
    finally:
        for s in sockets:
            s.close()
    statuses = [r[9:12] for r in replies]
    assert set(statuses) <= {b"408", b"503", b""}, set(statuses)
    assert statuses.count(b"503") >= 300 - 32
    assert all(b"too many open connections (at most 32)" in r for r in replies if r[9:12] == b"503")
    r = post(server, SMALL)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_the_connection_count_is_given_back(start):
    """Connections that close, however they close, free their place."""
    server, _ = start(max_connections=4)
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda _: post(server, SMALL), range(4)))
    wait_until(lambda: len(server.service.guard.open) == 0, "all connections closed")


def test_many_threads_do_not_confuse_the_guard(start):
    server, _ = start(max_connections=64)
    done = []

    def one(i):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for _ in range(3):
                done.append(c.post(f"/ai/run/{MODEL}", json={**SMALL, "seed": i}).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == [200] * 48
    wait_until(lambda: len(server.service.guard.open) == 0, "all connections closed")
