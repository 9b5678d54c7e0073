"""sd's own JSON dialect (sd/serve/native.py) and its progress stream (sd/serve/progress.py):
the strict schema, the catalogue derived from the registries, the events of a job in order with
their previews (the shipped tiny model, in-process), queue positions, cancelling, followers that
leave or wait, shutdown, and the token. Jobs that must stay queued or running until the test says
so run on the stand-in pipelines of tests/server_fixtures.py."""

import base64
import io
import json
import math
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sd.defaults import Defaults
from sd.errors import InputError
from sd.registry import REGISTRY, Registry
from sd.samplers import SAMPLERS
from sd.schedule import SCHEDULES
from sd.serve import native, progress
from sd.serve.cache import ModelCache
from sd.serve.jobs import RequestError
from sd.tiny import CHECKPOINT

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import (IMG2IMG, INPAINT, LCM, TOKEN, InProcessServer, fake_cache, png_bytes,  # noqa: E402
                             wait_until)

GENERATE = "/v1/sd/generate"


def body(**fields) -> bytes:
    return json.dumps({"model": IMG2IMG, "prompt": "a red circle", **fields}).encode()


def picture_b64(width=64, height=64) -> str:
    return base64.b64encode(png_bytes(np.full((height, width, 3), 90, np.uint8))).decode()


def refused(data: bytes) -> list[str]:
    with pytest.raises(RequestError) as e:
        native.to_job(data)
    assert e.value.status == 400
    return e.value.messages


# ---------------------------------------------------------------- the schema


def test_fields_pass_through_as_generate_takes_them():
    job = native.to_job(body(negative_prompt="blur", width=64, height=128, num_steps=3, guidance=2, seed=7,
                             num_images=2, sampler="euler_a", schedule="karras", sampler_options={"eta": 0.5},
                             clip_skip=1, prompt_style="weighted", step_cache=2, guidance_rescale=0.5,
                             original_size=[64, 64]))
    assert job.model == IMG2IMG
    assert job.kwargs == {"prompt": "a red circle", "negative_prompt": "blur", "width": 64, "height": 128,
                          "num_steps": 3, "guidance": 2, "seed": 7, "num_images": 2, "sampler": "euler_a",
                          "schedule": "karras", "sampler_options": {"eta": 0.5}, "clip_skip": 1,
                          "prompt_style": "weighted", "step_cache": 2, "guidance_rescale": 0.5,
                          "original_size": (64, 64)}
    # left out: left out, so the model's defaults apply
    assert native.to_job(body()).kwargs == {"prompt": "a red circle"}


def test_pictures_arrive_as_bytes_and_give_the_sides():
    image = picture_b64(72, 40)
    job = native.to_job(body(image="data:image/png;base64," + image, mask=image, strength=0.5))
    assert job.kwargs["image"] == base64.b64decode(image) == job.kwargs["mask"]
    assert (job.kwargs["width"], job.kwargs["height"]) == (72, 40)
    assert native.to_job(body(image=image, width=32)).kwargs["width"] == 32
    wide = base64.b64encode(png_bytes(np.zeros((100, 5000, 3), np.uint8))).decode()
    assert (lambda k: (k["width"], k["height"]))(native.to_job(body(image=wide)).kwargs) == (4096, 80)


@pytest.mark.parametrize("fields, message", [
    ({"widht": 64}, "widht: not a field of /v1/sd/generate (allowed: model, prompt,"),
    ({"width": 64.0}, "width: must be an integer in [8, 4096], got 64.0"),
    ({"width": True}, "width: must be an integer in [8, 4096], got true"),
    ({"num_steps": 0}, "num_steps: must be an integer in [1, 1000], got 0"),
    ({"num_images": 17}, "num_images: must be an integer in [1, 16], got 17"),
    ({"guidance": "7"}, 'guidance: must be a number in [0, 100], got "7"'),
    ({"seed": -1}, "seed: must be an integer in [0, 18446744073709551615], got -1"),
    ({"keep_unmasked": 1}, "keep_unmasked: must be true or false, got 1"),
    ({"sampler_options": [1]}, "sampler_options: must be an object of option names to values, got an array"),
    ({"original_size": [1, 2, 3]}, "original_size: must be an array of two integers, got an array of 3 items"),
    ({"image": ""}, "image: must be a non-empty base64 string"),
    ({"image": "not base64!"}, "image: not valid base64"),
    ({"image": base64.b64encode(b"GIF89a nonsense").decode()}, "image: not a readable image"),
    ({"prompt": "\ud800"}, "prompt: must be valid Unicode text (it holds a lone surrogate)"),
])
def test_the_schema_names_the_field_and_the_rule(fields, message):
    data = json.dumps({"model": IMG2IMG, "prompt": "x", **fields}).encode()
    assert any(m.startswith(message) for m in refused(data)), (message, refused(data))


def test_every_violation_is_listed_and_required_fields_are_named():
    messages = refused(json.dumps({"width": "wide", "zzz": 1, "yyy": 2}).encode())
    assert messages[:2] == ["model: required", "prompt: required"]
    assert any(m.startswith("zzz, yyy: not fields of /v1/sd/generate") for m in messages)
    assert 'width: must be an integer in [8, 4096], got "wide"' in messages
    assert refused(b"[1]") == ["body: must be a JSON object, got an array of 1 items"]
    assert refused(b"{") and refused(b'{"prompt": NaN}')


@pytest.mark.parametrize("fields, message", [
    ({"width": 60}, "width: must be a positive multiple of 8, got 60"),
    ({"sampler": "eulr"}, "sampler: 'eulr' is not one of euler, "),
    ({"schedule": "karas"}, "schedule: 'karas' is not one of"),
    ({"sampler_options": {"etaa": 1}}, "sampler_options: euler takes no option 'etaa'"),
    ({"strength": 0.5}, "strength: only applies with an image"),
    ({"prompt_style": "fancy"}, "prompt_style: 'fancy' is not one of plain, weighted"),
])
def test_the_cores_own_checks_run_before_anything_queues(fields, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        native.to_job(body(**fields))


def test_sampler_options_are_checked_against_the_models_own_sampler():
    """With no sampler named, the options are the model's default sampler's."""
    data = body(sampler_options={"eta": 0.5})
    with pytest.raises(InputError, match="sampler_options: euler takes no option 'eta'"):
        native.to_job(data)
    assert native.to_job(data, lambda model: Defaults(sampler="euler_a")).kwargs["sampler_options"] == {"eta": 0.5}


def test_error_replies_name_the_field():
    reply = native.error_reply(400, ["width: must be a positive multiple of 8, got 60", "image, mask: give both",
                                     "body: empty"])
    assert json.loads(reply.body) == {"errors": [
        {"field": "width", "message": "width: must be a positive multiple of 8, got 60"},
        {"field": None, "message": "image, mask: give both"}, {"field": "body", "message": "body: empty"}]}


# ---------------------------------------------------------------- a real model, in-process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An in-process server with the shipped tiny model as the img2img id."""
    cache = ModelCache(Registry(tmp_path_factory.mktemp("weights"), {IMG2IMG: CHECKPOINT}), device="cpu")
    server = InProcessServer(cache)
    yield server
    server.stop()


class Follower(threading.Thread):
    """A client reading a job's event stream into `events` [(name, data)]."""

    def __init__(self, url: str, job: str, headers: dict | None = None):
        super().__init__(daemon=True)
        self.url, self.events, self.status, self.opened = f"{url}/v1/sd/jobs/{job}/events", [], None, threading.Event()
        self.headers, self.client = headers or {}, httpx.Client(timeout=60)
        self.start()
        assert self.opened.wait(30), "the stream did not open"

    def run(self):
        try:
            with self.client.stream("GET", self.url, headers=self.headers) as r:
                self.status, self.content_type = r.status_code, r.headers.get("content-type")
                self.opened.set()
                name = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        self.events.append((name, json.loads(line[6:])))
        except httpx.HTTPError:
            pass  # closed by the test
        finally:
            self.opened.set()

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def test_the_catalogue_comes_from_the_registries(tiny):
    models = httpx.get(tiny.url + "/v1/sd/models").json()["models"]
    assert [m["id"] for m in models] == list(REGISTRY)
    served = next(m for m in models if m["id"] == IMG2IMG)
    assert served["mode"] == "img2img" and served["present"] and served["state"] in ("ready", "loaded")
    assert served["defaults"]["width"] == REGISTRY[IMG2IMG].defaults["width"]
    assert {"sampler", "schedule", "strength", "keep_unmasked"} <= set(served["defaults"])
    missing = next(m for m in models if m["id"] == LCM)
    assert not missing["present"] and missing["state"] == "not downloaded"
    assert next(m for m in models if m["id"] == INPAINT)["needs"] == ["image", "mask"]
    samplers = httpx.get(tiny.url + "/v1/sd/samplers").json()
    assert [s["name"] for s in samplers["samplers"]] == list(SAMPLERS)
    for s in samplers["samplers"]:
        spec = SAMPLERS[s["name"]]
        assert s["citation"] == spec.cite and [o["name"] for o in s["options"]] == list(spec.options)
        for o in s["options"]:
            default = spec.options[o["name"]]
            assert o["default"] == (str(default) if isinstance(default, float) and math.isinf(default) else default)
    unipc = next(s for s in samplers["samplers"] if s["name"] == "unipc")
    assert next(o for o in unipc["options"] if o["name"] == "solver_type")["choices"] == ["bh1", "bh2"]
    schedules = httpx.get(tiny.url + "/v1/sd/schedules").json()["schedules"]
    assert [s["name"] for s in schedules] == list(SCHEDULES) and all(s["description"] for s in schedules)


def test_a_jobs_events_in_order_with_previews(tiny):
    """Followed before its POST: queued, running, one progress event per step with the preview of that
    step's x0 (8x8 per 64x64 image, side by side), then done with the reply's own settings."""
    follower = Follower(tiny.url, "first-job")
    reply = httpx.post(tiny.url + GENERATE, content=body(width=64, height=64, num_steps=6, num_images=2, seed=3),
                       headers={"X-Job-Id": "first-job"}, timeout=120)
    assert reply.status_code == 200, reply.text
    follower.join(30)
    assert follower.status == 200 and follower.content_type.startswith("text/event-stream")
    answer = reply.json()
    assert answer["job"] == reply.headers["x-job-id"] == "first-job" and answer["model"] == IMG2IMG
    assert follower.names() == ["queued", "running"] + ["progress"] * 6 + ["done"]
    assert follower.events[0][1] == {"job": "first-job", "position": 1}
    progress = [data for name, data in follower.events if name == "progress"]
    assert [(p["step"], p["steps"]) for p in progress] == [(i, 6) for i in range(1, 7)]
    for p in progress:
        assert Image.open(io.BytesIO(base64.b64decode(p["preview"]))).size == (16, 8)
    assert len({p["preview"] for p in progress}) > 1  # the picture forms
    settings = [image["settings"] for image in answer["images"]]
    assert follower.events[-1][1]["images"] == settings and [s["seed"] for s in settings] == [3, 4]
    for image in answer["images"]:  # each PNG carries its settings
        png = Image.open(io.BytesIO(base64.b64decode(image["png"])))
        assert png.size == (64, 64) and json.loads(png.info["sd"]) == {**image["settings"], "model": IMG2IMG}
    state = httpx.get(tiny.url + "/v1/sd/jobs/first-job").json()
    assert state["state"] == "done" and state["images"] == settings and (state["step"], state["steps"]) == (6, 6)
    late = Follower(tiny.url, "first-job")  # a late follower hears how it ended, and the stream ends
    late.join(30)
    assert late.names() == ["done"]


def test_a_job_without_an_id_gets_one_and_a_failed_one_says_why(tiny):
    reply = httpx.post(tiny.url + GENERATE, content=body(width=64, height=64, num_steps=1), timeout=120)
    job = reply.json()["job"]
    assert reply.headers["x-job-id"] == job and native.JOB_ID.fullmatch(job)
    follower = Follower(tiny.url, "bad-one")
    reply = httpx.post(tiny.url + GENERATE, content=body(width=60), headers={"X-Job-Id": "bad-one"})
    assert reply.status_code == 400
    assert reply.json() == {"errors": [{"field": "width", "message": "width: must be a positive multiple of 8, got 60"}]}
    follower.join(30)
    assert follower.events == [("failed", {"job": "bad-one", "status": 400, "errors": reply.json()["errors"]})]
    for bad in ("", "a/b", "x" * 65, "sp ace"):
        r = httpx.post(tiny.url + GENERATE, content=body(), headers={"X-Job-Id": bad})
        assert r.status_code == 400 and r.json()["errors"][0]["message"].startswith("x-job-id: must be 1 to 64 letters")
    r = httpx.get(tiny.url + "/v1/sd/jobs/no-such-job")
    assert r.status_code == 404 and r.json()["errors"][0]["message"].startswith("job: no job \"no-such-job\"")
    assert httpx.post(tiny.url + "/v1/sd/jobs/no-such-job/cancel").status_code == 404
    r = httpx.get(tiny.url + "/v1/sd/nothing")
    assert r.status_code == 404 and r.json() == {"errors": [{"field": None, "message": "no route for GET /v1/sd/nothing"}]}


# ---------------------------------------------------------------- held jobs: queue, cancel, followers


@pytest.fixture
def held(tmp_path):
    """An in-process server whose stand-in pipelines run until the test releases them."""
    cache = fake_cache(tmp_path, release=False)
    server = InProcessServer(cache)
    yield server, cache
    for fake in cache.fakes.values():
        fake.release.set()
    server.stop()


def post(pool, server, job: str, **fields):
    return pool.submit(httpx.post, server.url + GENERATE, content=body(**fields), headers={"X-Job-Id": job},
                       timeout=60)


def test_queue_positions_and_cancelling(held):
    server, cache = held
    tracker = lambda: server.service.jobs  # noqa: E731
    with ThreadPoolExecutor(4) as pool:
        first = post(pool, server, "a")
        wait_until(lambda: IMG2IMG in cache.fakes and cache.fakes[IMG2IMG].started.is_set(), "the first job running")
        followers = {job: Follower(server.url, job) for job in ("b", "c")}
        second = post(pool, server, "b")
        wait_until(lambda: followers["b"].events == [("queued", {"job": "b", "position": 1})], "b queued 1st")
        third = post(pool, server, "c")
        wait_until(lambda: followers["c"].events == [("queued", {"job": "c", "position": 2})], "c queued 2nd")
        again = httpx.post(server.url + GENERATE, content=body(), headers={"X-Job-Id": "c"})
        assert again.status_code == 409 and "'c' names a job that is still queued" in again.text
        # cancelling a queued job: out of the queue at once, its request answered, the next one moves up
        r = httpx.post(server.url + "/v1/sd/jobs/b/cancel")
        assert r.status_code == 202 and r.json()["cancelled"]
        assert second.result().status_code == 409
        assert second.result().json()["errors"][0]["message"] == "job b: cancelled (POST /v1/sd/jobs/b/cancel)"
        followers["b"].join(30)
        assert followers["b"].names() == ["queued", "stopped"]
        wait_until(lambda: ("queued", {"job": "c", "position": 1}) in followers["c"].events, "c moved up")
        # cancelling the running job: stopped at its next checkpoint
        running = Follower(server.url, "a")
        assert running.names() == [] or running.names()[0] == "running"
        assert httpx.post(server.url + "/v1/sd/jobs/a/cancel").status_code == 202
        assert first.result().status_code == 409
        assert cache.fakes[IMG2IMG].stopped.wait(30)
        running.join(30)
        assert running.names()[-1] == "stopped"
        assert httpx.get(server.url + "/v1/sd/jobs/a").json()["state"] == "stopped"
        # the third runs; released, it is done
        wait_until(lambda: "running" in followers["c"].names(), "c running")
        cache.fakes[IMG2IMG].release.set()
        assert third.result().status_code == 200
        followers["c"].join(30)
        assert followers["c"].names() == ["queued", "queued", "running", "done"]
        cancelled_late = httpx.post(server.url + "/v1/sd/jobs/c/cancel").json()
        assert cancelled_late["state"] == "done" and not cancelled_late["cancelled"]
    assert tracker().following() == 0


def test_a_follower_that_leaves_is_freed(held, monkeypatch):
    """A client that closes its connection mid-stream is forgotten when it goes, not when a write to
    it fails: with no keep-alive ever written, an idle stream must still be freed."""
    monkeypatch.setattr(progress, "KEEPALIVE", 10 ** 9)
    server, cache = held
    with ThreadPoolExecutor(1) as pool:
        running = post(pool, server, "long")
        wait_until(lambda: IMG2IMG in cache.fakes and cache.fakes[IMG2IMG].started.is_set(), "running")
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(b"GET /v1/sd/jobs/long/events HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"event: running" not in received:
                received += client.recv(4096)
            assert server.service.jobs.following() == 1
        wait_until(lambda: server.service.jobs.following() == 0, "the stream freed")
        cache.fakes[IMG2IMG].release.set()
        assert running.result().status_code == 200


def test_a_stream_for_an_unclaimed_id_ends_at_shutdown(held):
    """What SIGTERM does in `sd serve` (sd/serve/cli.py's handler): close the worker, then stop
    uvicorn, which waits for open responses. A stream waiting for a job nobody posted ends then."""
    server, cache = held
    follower = Follower(server.url, "never-posted")
    wait_until(lambda: server.service.jobs.following() == 1, "following")
    server.service.worker.close_from_any_thread("the server is shutting down")
    server.server.should_exit = True
    follower.join(30)
    assert follower.events == [("failed", {"job": "never-posted", "status": 503, "errors": [
        {"field": None, "message": "job never-posted: the server is shutting down"}]})]
    server.thread.join(30)
    assert not server.thread.is_alive()


# ---------------------------------------------------------------- the token and the page's files


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    server = InProcessServer(fake_cache(tmp_path_factory.mktemp("guarded")), api_token=TOKEN)
    yield server
    server.stop()


def test_the_api_needs_the_token_and_the_page_does_not(guarded):
    for method, path in (("GET", "/v1/sd/models"), ("GET", "/v1/sd/samplers"), ("GET", "/v1/sd/jobs/x"),
                         ("GET", "/v1/sd/jobs/x/events"), ("POST", "/v1/sd/jobs/x/cancel"), ("POST", GENERATE)):
        r = httpx.request(method, guarded.url + path, content=body() if method == "POST" else None)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert r.json() == {"errors": [{"field": "authorization", "message":
                                        "authorization: missing; send Authorization: Bearer <API token>"}]}
    wrong = httpx.get(guarded.url + "/v1/sd/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "wrong API token" in wrong.text
    right = httpx.get(guarded.url + "/v1/sd/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    # a job id is not even checked, let alone claimed, without the token
    r = httpx.post(guarded.url + GENERATE, content=body(), headers={"X-Job-Id": "bad/id"})
    assert r.status_code == 401


def test_the_page_and_its_files(guarded):
    static = Path(native.__file__).parent / "static"
    page = httpx.get(guarded.url + "/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == (static / "index.html").read_bytes()
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8"),
                       ("icon.svg", "image/svg+xml")):
        r = httpx.get(f"{guarded.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == kind and r.content == (static / name).read_bytes()
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-content-type-options"] == "nosniff"
        again = httpx.get(f"{guarded.url}/static/{name}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and not again.content
    for path in ("/static/nope.js", "/static/..%2Fnative.py", "/static/native.py", "/static/%2e%2e/app.py"):
        assert httpx.get(guarded.url + path).status_code == 404, path
    # every module the page imports is shipped, and nothing is loaded from elsewhere
    sources = {p.name: p.read_text() for p in static.iterdir()}
    for name, text in sources.items():
        for imported in __import__("re").findall(r'from "\./([\w.]+)"', text):
            assert imported in sources, (name, imported)
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, name
