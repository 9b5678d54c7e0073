"""`sd serve` over real HTTP: real server processes (tests/server_fixtures.py) serving tiny random-weight
models through `--model ID=SOURCE`, plus a few in-process checks of the app with a fake Models."""

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from sd.api import CODES, parse_input
from sd.models import REGISTRY
from sd.server import create_app, main

pytest.register_assert_rewrite("server_fixtures")  # before the import below, which the plugin line then reuses
from server_fixtures import (BUSY_TIMEOUT, IMG2IMG, INPAINT, LCM, LIGHTNING, PNG_SIGNATURE, REPO,  # noqa: E402
                             SDXL, TOKEN, ServerProcess, decode, mask_png, picture, png_bytes)

pytest_plugins = ["server_fixtures"]

SMALL = {"width": 256, "height": 256, "num_steps": 2, "seed": 1}


def run(client, model, body, prefix="/ai/run/", **kw) -> httpx.Response:
    # json.dumps escapes what httpx's json= can't send (a lone surrogate)
    return client.post(prefix + model, content=json.dumps(body), headers={"Content-Type": "application/json"}, **kw)


def assert_png(response, size=(256, 256)) -> bytes:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(PNG_SIGNATURE)
    assert Image.open(__import__("io").BytesIO(response.content)).size == size
    return response.content


def assert_envelope(response, status, *fragments) -> list[str]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"success", "errors", "messages", "result"}
    assert body["success"] is False and body["messages"] == [] and body["result"] is None
    assert body["errors"], body
    expected_code = 7000 if status == 404 and "no route" in response.text else CODES[status]
    for e in body["errors"]:
        assert set(e) == {"code", "message"} and e["code"] == expected_code and isinstance(e["message"], str)
    messages = [e["message"] for e in body["errors"]]
    assert "Traceback" not in response.text
    for fragment in fragments:
        assert any(fragment in m for m in messages), (fragment, messages)
    return messages


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def busy(busy_server):
    with busy_server.client() as c:
        yield c


# ---------------------------------------------------------------- generation


def test_same_seed_same_png_other_seed_differs(client):
    first = assert_png(run(client, IMG2IMG, {"prompt": "a red circle", **SMALL}))
    assert assert_png(run(client, IMG2IMG, {"prompt": "a red circle", **SMALL})) == first
    assert assert_png(run(client, IMG2IMG, {"prompt": "a red circle", **SMALL, "seed": 2})) != first
    # seed omitted: a random one each time
    a, b = (assert_png(run(client, IMG2IMG, {"prompt": "a red circle", "width": 256, "height": 256,
                                              "num_steps": 1})) for _ in range(2))
    assert a != b


def test_both_routes_and_the_percent_encoded_id(client):
    body = {"prompt": "a cat", **SMALL}
    expected = assert_png(run(client, SDXL, body))
    for path in (f"/ai/run/{SDXL}", f"/client/v4/accounts/acc123/ai/run/{SDXL}",
                 "/client/v4/accounts/acc123/ai/run/" + SDXL.replace("/", "%2F"),
                 "/ai/run/" + SDXL.replace("/", "%2F").replace("@", "%40")):
        assert assert_png(client.post(path, json=body)) == expected, path


def test_every_model_serves(client):
    image, mask = list(picture()), list(mask_png())
    for model in REGISTRY:
        extra = {"image": image, "mask": mask} if model == INPAINT else {}
        assert_png(run(client, model, {"prompt": "a cat", **SMALL, **extra}))


@pytest.mark.parametrize("field, value", [("prompt", "a blue square"), ("negative_prompt", "blurry"),
                                          ("guidance", 3.0), ("num_steps", 3)])
def test_each_setting_changes_the_image(client, field, value):
    base = {"prompt": "a red circle", **SMALL, "guidance": 7.5}
    expected = assert_png(run(client, LCM, base))
    assert assert_png(run(client, LCM, {**base, field: value})) != expected


def test_width_and_height(client):
    assert_png(run(client, IMG2IMG, {"prompt": "a cat", **SMALL, "width": 320, "height": 256}), size=(320, 256))
    assert_png(run(client, SDXL, {"prompt": "a cat", **SMALL, "width": 256, "height": 384}), size=(256, 384))


def test_omitted_fields_take_the_models_defaults(client):
    # The img2img model's registry default is 512x512.
    assert_png(run(client, IMG2IMG, {"prompt": "a cat", "num_steps": 1, "seed": 3}), size=(512, 512))
    # Lightning: 4 steps, guidance 0 by default; the same as asking for them, not as 3 steps.
    body = {"prompt": "a cat", "width": 256, "height": 256, "seed": 4}
    default = assert_png(run(client, LIGHTNING, body))
    assert assert_png(run(client, LIGHTNING, {**body, "num_steps": 4, "guidance": 0})) == default
    assert assert_png(run(client, LIGHTNING, {**body, "num_steps": 3, "guidance": 0})) != default


def test_image_as_array_and_as_base64_give_the_same_image(client):
    png = picture(320, 256, seed=5)
    body = {"prompt": "a cat", "num_steps": 4, "seed": 1, "strength": 0.5}
    from_array = assert_png(run(client, IMG2IMG, {**body, "image": list(png)}), size=(320, 256))
    b64 = base64.b64encode(png).decode()
    assert assert_png(run(client, IMG2IMG, {**body, "image_b64": b64}), size=(320, 256)) == from_array
    wrapped = "data:image/png;base64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    assert assert_png(run(client, IMG2IMG, {**body, "image_b64": wrapped}), size=(320, 256)) == from_array
    # width / height given: the picture is resized to them
    assert_png(run(client, IMG2IMG, {**body, "image": list(png), "width": 256, "height": 256}))


def test_strength(client):
    png = picture(seed=6)
    body = {"prompt": "a cat", "num_steps": 4, "seed": 1, "image": list(png)}
    # strength 0 runs no step: the input comes back
    assert np.array_equal(decode(assert_png(run(client, IMG2IMG, {**body, "strength": 0}))), decode(png))
    half = assert_png(run(client, IMG2IMG, {**body, "strength": 0.5}))
    assert half != assert_png(run(client, IMG2IMG, {**body, "strength": 1}))
    assert half == assert_png(run(client, IMG2IMG, {**body, "strength": 0.5}))


def test_strength_without_an_image_is_ignored(client):
    body = {"prompt": "a cat", **SMALL}
    assert assert_png(run(client, IMG2IMG, {**body, "strength": 0.3})) == assert_png(run(client, IMG2IMG, body))


def test_inpainting_repaints_the_mask_and_keeps_the_rest(client):
    png, mask = picture(seed=7), mask_png()
    got = decode(assert_png(run(client, INPAINT, {"prompt": "a cat", "num_steps": 2, "seed": 1,
                                                  "image": list(png), "mask": list(mask)})))
    keep = np.asarray(Image.open(__import__("io").BytesIO(mask))) == 0
    before = decode(png)
    assert np.array_equal(got[keep], before[keep])
    assert not np.array_equal(got[~keep], before[~keep])
    # a mask on a 4-channel model: repaints by blending, also 200
    assert_png(run(client, IMG2IMG, {"prompt": "a cat", "num_steps": 2, "seed": 1, "image": list(png),
                                     "mask": list(mask)}))


def test_sixteen_concurrent_requests_all_answered(server):
    def one(i):
        return httpx.post(f"{server.url}/ai/run/{IMG2IMG}", headers=server.headers, timeout=60,
                          json={"prompt": f"picture {i}", "width": 256, "height": 256, "num_steps": 1, "seed": i})
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    assert len({r.content for r in responses}) == 16


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("body, message", [
    ({}, "prompt: required"),
    ({"prompt": ""}, "prompt: must be a string of at least 1 character, got \"\""),
    ({"prompt": 5}, "prompt: must be a string of at least 1 character, got 5"),
    ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt: must be a string, got an array of 1 items"),
    ({"prompt": "x", "width": 4000}, "width: must be an integer in [256, 2048], got 4000"),
    ({"prompt": "x", "height": 255}, "height: must be an integer in [256, 2048], got 255"),
    ({"prompt": "x", "width": 256.0}, "width: must be an integer in [256, 2048], got 256.0"),
    ({"prompt": "x", "width": True}, "width: must be an integer in [256, 2048], got true"),
    ({"prompt": "x", "num_steps": 21}, "num_steps: must be an integer in [1, 20], got 21"),
    ({"prompt": "x", "num_steps": 0}, "num_steps: must be an integer in [1, 20], got 0"),
    ({"prompt": "x", "strength": 1.5}, "strength: must be a number in [0, 1], got 1.5"),
    ({"prompt": "x", "strength": False}, "strength: must be a number in [0, 1], got false"),
    ({"prompt": "x", "guidance": "7"}, "guidance: must be a number in [0, 100], got \"7\""),
    ({"prompt": "x", "guidance": None}, "guidance: must be a number in [0, 100], got null"),
    ({"prompt": "x", "seed": -1}, "seed: must be an integer in [0, 18446744073709551615], got -1"),
    ({"prompt": "x", "seed": 2 ** 64}, "seed: must be an integer in [0, 18446744073709551615], got "
                                       "18446744073709551616"),
    ({"prompt": "x", "image": [1, 2, 300]}, "image: must be an array of integers in [0, 255] (the bytes of an image "
                                            "file), got 300 at index 2"),
    ({"prompt": "x", "image": "abc"}, "image: must be an array of integers in [0, 255]"),
    ({"prompt": "x", "image": [1, 2, 3]}, "image: not a readable image"),
    ({"prompt": "x", "mask": [True]}, "mask: must be an array of integers in [0, 255] (the bytes of an image file), "
                                      "got true at index 0"),
    ({"prompt": "x", "image_b64": "abc"}, "image_b64: not valid base64"),
    ({"prompt": "x", "image_b64": base64.b64encode(b"hello").decode()}, "image_b64: not a readable image"),
    ({"prompt": "x", "image_b64": 12}, "image_b64: must be a non-empty base64 string"),
    ({"prompt": "x", "image": list(picture()), "image_b64": base64.b64encode(picture()).decode()},
     "image, image_b64: give one of them, not both"),
    ({"prompt": "x", "steps": 3}, "steps: not an input of text-to-image models (allowed: prompt, negative_prompt"),
    ({"prompt": "\ud800"}, "prompt: must be valid Unicode text"),
    # the pipeline's own checks, after the queue
    ({"prompt": "x", "width": 260, "num_steps": 1}, "width: must be a positive multiple of 8, got 260"),
    ({"prompt": "x", "num_steps": 1, "mask": list(mask_png())}, "mask: needs an image to inpaint"),
])
def test_bad_input_names_the_field_and_rule(client, body, message):
    assert_envelope(run(client, IMG2IMG, body), 400, message)


def test_every_violation_is_listed(client):
    messages = assert_envelope(run(client, IMG2IMG, {"prompt": "", "width": 1, "seed": "x", "typo": 1}), 400)
    assert [m.split(":")[0] for m in messages] == ["typo", "prompt", "width", "seed"]


def test_inpainting_needs_image_and_mask(client):
    assert_envelope(run(client, INPAINT, {"prompt": "x", **SMALL}), 400, "image: required by " + INPAINT)
    assert_envelope(run(client, INPAINT, {"prompt": "x", **SMALL, "image": list(picture())}), 400, "mask: required")
    wide = list(mask_png(512, 256))
    assert_envelope(run(client, INPAINT, {"prompt": "x", **SMALL, "image": list(picture()), "mask": wide}), 400,
                    "mask: must have the image's aspect ratio")


@pytest.mark.parametrize("body, message", [
    (b"", "body: empty"), (b"{", "body: not valid JSON"), (b"[1, 2]", "body: must be a JSON object, got an array"),
    (b'"a cat"', "body: must be a JSON object, got \"a cat\""), (b'{"prompt": "x", "guidance": NaN}', "NaN"),
    (b'{"prompt": "x", "guidance": -Infinity}', "-Infinity"), (b'{"prompt": "x", "guidance": 1e999}', "1e999"),
    (b'{"prompt": "x", "seed": ' + b"9" * 500 + b"}", "a number with 500 digits"),
    (b'{"prompt": "\xff"}', "body: not UTF-8"), (b"[" * 100000 + b"]" * 100000, "body: JSON nested too deeply"),
])
def test_bodies_that_are_not_a_json_object(client, body, message):
    assert_envelope(client.post(f"/ai/run/{IMG2IMG}", content=body), 400, message)


def test_auth(server, busy_server):
    body = {"prompt": "x", **SMALL}
    url = f"{server.url}/ai/run/{IMG2IMG}"
    r = httpx.post(url, json=body)
    assert_envelope(r, 401, "authorization: missing")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_envelope(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401, "wrong API token")
    assert_envelope(httpx.post(url, json=body, headers={"Authorization": f"Basic {TOKEN}"}), 401)
    assert_envelope(httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}x"}), 401)
    assert_envelope(httpx.get(f"{server.url}/ai/models/search"), 401)
    assert_png(httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60))
    # checked before the body is read: an unauthenticated oversize body is a 401, not a 413
    assert_envelope(httpx.post(url, content=b"x" * (5 * 2 ** 20)), 401)
    # no token configured: no check; /healthz never needs one
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert_png(httpx.post(f"{busy_server.url}/ai/run/{IMG2IMG}", json=body, timeout=60))


def test_not_found_and_wrong_method(client):
    assert_envelope(run(client, "@cf/nope/model", {"prompt": "x"}), 404, "model: '@cf/nope/model' is not one of")
    assert_envelope(run(client, "@cf/meta/llama-3-8b-instruct", {"prompt": "x"},
                        prefix="/client/v4/accounts/a/ai/run/"), 404, "is not one of")
    assert_envelope(client.get("/nowhere"), 404, "no route for GET /nowhere")
    assert_envelope(client.post("/ai/run"), 404, "no route")
    r = client.get(f"/ai/run/{IMG2IMG}")
    assert_envelope(r, 405, "method GET not allowed")
    assert "POST" in r.headers["allow"]


def test_oversize_bodies(server, client):
    limit = 4 * 2 ** 20
    big = {"prompt": "x" * limit}
    assert_envelope(run(client, IMG2IMG, big), 413, f"body: larger than the server's limit of {limit} bytes")
    assert_png(run(client, IMG2IMG, {"prompt": "x", **SMALL}))  # the drained connection still works

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(6):
            yield b" " * 2 ** 20
    assert_envelope(client.post(f"/ai/run/{IMG2IMG}", content=chunks()), 413, "body: larger")
    assert_envelope(run(client, IMG2IMG, {"prompt": "x", **SMALL, "image": [0] * (limit // 2)}), 413)
    # A Content-Length no one will ever send: answered at once, and the connection closed.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /ai/run/{IMG2IMG} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {10 ** 12}\r\n\r\n{{\"prompt\"".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert json.loads(body)["errors"][0]["code"] == CODES[413]


def test_a_burst_past_the_queue_gets_429(busy_server):
    slow = {"prompt": "x", "width": 256, "height": 256, "num_steps": 20, "seed": 1}
    url = f"{busy_server.url}/ai/run/{IMG2IMG}"
    httpx.post(url, json={**slow, "num_steps": 1}, timeout=60)  # model loaded before the burst
    wait_idle(httpx.Client(base_url=busy_server.url))
    barrier = threading.Barrier(8)

    def one(_):
        barrier.wait()
        return httpx.post(url, json=slow, timeout=60)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    statuses = sorted(r.status_code for r in responses)
    # one runs, one waits, the rest are refused (a fourth may slip in if the first ends mid-burst)
    assert set(statuses) == {200, 429} and 2 <= statuses.count(200) <= 4, statuses
    for r in responses:
        if r.status_code == 429:
            assert_envelope(r, 429, "the queue is full")
            assert r.headers["retry-after"] == "1"
        else:
            assert_png(r)


def test_missing_weights_503(busy):
    # --model pointing at a path that does not exist
    assert_envelope(run(busy, LCM, {"prompt": "x", **SMALL}), 503, f"{LCM}: no such file or folder",
                    "(given with --model)")
    # no override, and nothing in the (empty) weights dir: says which download fetches them
    assert_envelope(run(busy, LIGHTNING, {"prompt": "x", **SMALL}), 503, f"fetch them with: sd download {LIGHTNING}")
    # bad input still comes first
    assert_envelope(run(busy, LIGHTNING, {"prompt": ""}), 400)


def test_unloadable_weights_500_with_the_details_in_the_log_only(busy_server, busy):
    images = {"image": list(picture()), "mask": list(mask_png())}
    for model, detail in ((SDXL, "not a safetensors file"), (INPAINT, "model_index.json missing")):
        messages = assert_envelope(run(busy, model, {"prompt": "x", **SMALL, **images}), 500,
                                   f"{model}: the model's weights could not be loaded (see the server log, request ")
        ref = messages[0].rsplit(" ", 1)[1].rstrip(")")
        assert "/" not in messages[0].split("loaded")[1]  # no server path in the answer
        time.sleep(0.2)
        log = busy_server.log()
        assert f"request {ref}" in log and "Traceback" in log and detail in log
    assert busy.get("/healthz").status_code == 200


def wait_idle(client, seconds=10):
    deadline = time.monotonic() + seconds
    while (health := client.get("/healthz").json())["running"] is not None or health["queue"]:
        assert time.monotonic() < deadline, "the worker stayed busy"
        time.sleep(0.02)


def test_timeout_504_stops_the_job(busy):
    wait_idle(busy)
    start = time.monotonic()
    # 2048x2048: 20 steps of about a second each on the tiny model, so still sampling at the timeout
    r = run(busy, IMG2IMG, {"prompt": "x", "width": 2048, "height": 2048, "num_steps": 20})
    assert_envelope(r, 504, f"timed out after {BUSY_TIMEOUT} s")
    assert BUSY_TIMEOUT <= time.monotonic() - start < BUSY_TIMEOUT + 3
    # the job stops at its next sampler step: the worker is free again soon
    wait_idle(busy, 5)
    assert_png(run(busy, IMG2IMG, {"prompt": "x", **SMALL}))


def test_a_client_that_gives_up_loses_its_place(busy_server, busy):
    wait_idle(busy)
    slow = {"prompt": "x", "width": 512, "height": 512, "num_steps": 20}
    first = ThreadPoolExecutor(1).submit(run, busy, IMG2IMG, slow)
    deadline = time.monotonic() + 5
    while busy.get("/healthz").json()["running"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{busy_server.url}/ai/run/{IMG2IMG}", json={**slow, "prompt": "y"}, timeout=0.3)
    time.sleep(0.3)
    assert busy.get("/healthz").json()["queue"] == 0  # the abandoned request left the queue
    assert first.result().status_code == 200
    assert f"POST /ai/run/{IMG2IMG} {IMG2IMG} 499 (client gone)" in busy_server.log()


def test_hundreds_of_bad_requests_get_4xx_envelopes(server, client):
    cases = list(bad_requests())
    assert len(cases) >= 300
    failures = []
    for what, content, expected in cases:
        r = client.post(f"/ai/run/{IMG2IMG}", content=content, headers={"Content-Type": "application/json"})
        try:
            assert_envelope(r, expected)
        except AssertionError as e:
            failures.append(f"{what}: {e}")
    assert not failures, "\n".join(failures[:20])
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["ok"] is True and server.proc.poll() is None
    assert_png(run(client, IMG2IMG, {"prompt": "still fine", **SMALL}))


def bad_requests():
    """(what, body bytes, expected status): wrong types, out-of-range and huge numbers, NaN and
    Infinity literals, broken base64, images that are not images, broken JSON, non-UTF-8, deep nesting,
    oversize bodies."""
    base = {"prompt": "a cat", "width": 256, "height": 256, "num_steps": 1}
    common = ["x", "", True, False, None, [], [1], {}, {"a": 1}]
    ints = common + [1.5, 256.0, -1, -(10 ** 30), 10 ** 30, 1e300, -1e300, "256"]
    png = picture(64, 64)
    not_images = [list(b"GIF89a"), list(b"hello world"), list(png[:60]), list(png[:-30]), [0] * 64, [255] * 3,
                  list(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), list(b"RIFF\x00\x00\x00\x00WEBPVP8 ")]
    values = {
        "width": ints + [0, 255, 2049, 4000], "height": ints + [0, 255, 2049, 4000],
        "num_steps": ints + [0, 21, 100, 1.0], "seed": ints + [2 ** 64, 2 ** 70],
        "strength": common + [-0.1, 1.1, 2, "0.5", 1e300, -1e300],
        "guidance": common + [-1, -0.5, 101, 1e300, "7.5"],
        "prompt": ["", 1, 1.5, True, None, [], ["a"], {}, "\ud800", "a\udfff"],
        "negative_prompt": [1, 1.5, True, None, [], ["a"], {}, "\udbff"],
        "image": ["x", "", 1, True, None, {}, [], [256], [-1], [1.5], [True], ["a"], [None], [[1]], [1, 2, 3]]
                 + not_images,
        "mask": ["x", 1, None, {}, [], [256], [-1], [0.5], [False], [[0]]] + not_images,
        "image_b64": [1, True, None, [], {}, "", "abc", "@@@@", "====", "a", "ab=c", "data:image/png;base64,!!!",
                      base64.b64encode(b"hello").decode(), base64.b64encode(png[:50]).decode(),
                      base64.b64encode(b"\x00" * 100).decode(), "éàü"],
    }
    for field, bad in values.items():
        for value in bad:
            yield f"{field}={value!r:.40}", json.dumps({**base, field: value}).encode(), 400
    for extra in ({"steps": 3}, {"Prompt": "x"}, {"lora": "x"}, {"": 1}, {f"k{i}": i for i in range(50)},
                  {"image": list(png), "image_b64": base64.b64encode(png).decode()}):
        yield f"extra {list(extra)[:3]}", json.dumps({**base, **extra}).encode(), 400
    for body in ({}, {"width": 256}, {"negative_prompt": "x"}):
        yield f"no prompt {body}", json.dumps(body).encode(), 400
    raw = [b"", b" ", b"\n", b"not json", b"{", b"}", b'{"prompt": "x",}', b"{'prompt': 'x'}", b"[]", b'"x"', b"1",
           b"null", b"true", b"1e999", b'{"prompt": NaN}', b'{"prompt": "x", "guidance": NaN}',
           b'{"prompt": "x", "guidance": Infinity}', b'{"prompt": "x", "guidance": -Infinity}',
           b'{"prompt": "x", "strength": 1e999}', b'{"prompt": "x", "seed": -1e999}',
           b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", b'{"prompt": "x", "width": ' + b"2" * 101 + b"}",
           b"[" * 100000 + b"]" * 100000, b'{"prompt": "x", "seed": ' + b"[" * 50000 + b"]" * 50000 + b"}",
           b'{"a":' * 30000 + b"1" + b"}" * 30000, b'{"prompt": "\xff\xfe"}', b"\xef\xbb\xbf" + b'{"prompt": "x"}',
           '{"prompt": "x"}'.encode("utf-16"), b"\x00" * 100, b'{"prompt": "x"} trailing', b'{"prompt": "x"}{}',
           b'{"prompt": "x", "prompt": 5}', b'{"prompt": "\\ud800"}', b'{"prompt": "x", "image": [1, 2, }']
    for i, body in enumerate(raw):
        yield f"raw #{i} {body[:30]!r}", body, 400
    rng = np.random.default_rng(0)
    for i in range(60):
        yield f"random bytes #{i}", rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes(), 400
    for i in range(40):  # valid JSON, random structure; an unknown field keeps any of it from being valid
        value = random_json(rng, 4)
        yield f"random JSON #{i}", json.dumps({**value, "zzz": 1} if isinstance(value, dict) else value).encode(), 400
    limit = 4 * 2 ** 20
    yield "oversize prompt", json.dumps({"prompt": "x" * limit}).encode(), 413
    yield "oversize image", json.dumps({**base, "image": [7] * (limit // 2)}).encode(), 413
    yield "oversize junk", b"{" * (limit + 1), 413


def random_json(rng, depth):
    kind = rng.integers(0, 7 if depth else 4)
    if kind == 0:
        return int(rng.integers(-10 ** 9, 10 ** 9))
    if kind == 1:
        return float(rng.normal() * 1e6)
    if kind == 2:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 10))))
    if kind == 3:
        return [None, True, False][int(rng.integers(0, 3))]
    if kind == 4:
        return [random_json(rng, depth - 1) for _ in range(int(rng.integers(0, 4)))]
    keys = ["prompt", "width", "height", "image", "mask", "seed", "num_steps", "zzz"]
    return {keys[int(rng.integers(0, len(keys)))]: random_json(rng, depth - 1) for _ in range(int(rng.integers(0, 4)))}


# ---------------------------------------------------------------- the other routes, logs, shutdown


def test_models_search(client):
    for path in ("/ai/models/search", "/client/v4/accounts/acc/ai/models/search"):
        body = client.get(path).json()
        assert body["success"] is True and body["errors"] == [] and body["messages"] == []
        assert [m["name"] for m in body["result"]] == list(REGISTRY)
        for entry in body["result"]:
            assert entry["task"] == "Text-to-Image" and entry["present"] is True and entry["description"]
        assert body["result_info"]["total_count"] == len(REGISTRY)
    assert client.get("/ai/models/search", params={"page": 2}).json()["result"] == []
    assert len(client.get("/ai/models/search", params={"per_page": 2}).json()["result"]) == 2
    assert_envelope(client.get("/ai/models/search", params={"page": "x"}), 400, "page: must be an integer")


def test_healthz(client, busy):
    run(client, IMG2IMG, {"prompt": "x", **SMALL})
    body = client.get("/healthz").json()
    assert body["ok"] is True and body["queue"] == 0 and body["queue_size"] == 32 and body["running"] is None
    assert IMG2IMG in body["loaded"] and body["device"] == "cpu"
    assert busy.get("/healthz").json()["queue_size"] == 1


def test_one_log_line_per_request(server, client):
    run(client, IMG2IMG, {"prompt": "logged", **SMALL, "seed": 99})
    run(client, IMG2IMG, {"prompt": ""})
    time.sleep(0.2)
    lines = server.log().splitlines()
    assert any(f"POST /ai/run/{IMG2IMG} {IMG2IMG} 200 " in line for line in lines)
    assert any(f"POST /ai/run/{IMG2IMG} {IMG2IMG} 400 " in line for line in lines)
    assert any("GET /healthz - 200 " in line for line in lines)
    assert not any("Traceback" in line for line in lines)


def test_sigterm_finishes_the_running_request_and_exits_0(tiny_models, tmp_path):
    srv = ServerProcess(["--model", f"{IMG2IMG}={tiny_models['sd15']}", "--weights-dir", str(tmp_path)],
                        tmp_path / "log").wait_ready()
    try:
        url = f"{srv.url}/ai/run/{IMG2IMG}"
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url, json={"prompt": "x", "width": 512, "height": 512,
                                                         "num_steps": 20}, timeout=60)
            deadline = time.monotonic() + 20
            while httpx.get(srv.url + "/healthz").json()["running"] is None:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            waiting = pool.submit(httpx.post, url, json={"prompt": "y", **SMALL}, timeout=60)
            while httpx.get(srv.url + "/healthz").json()["queue"] == 0 and not waiting.done():
                time.sleep(0.01)
            start = time.monotonic()
            srv.proc.send_signal(__import__("signal").SIGTERM)
            assert_png(running.result(), size=(512, 512))
            # it was waiting: answered, not dropped
            assert_envelope(waiting.result(), 503, "the server is shutting down")
        assert srv.proc.wait(15) == 0
        assert time.monotonic() - start < 15
    finally:
        srv.stop()
    assert "Shutting down" in srv.log()


# ---------------------------------------------------------------- command line and in-process


def test_bad_options_exit_2(capsys):
    assert main(["--model", "nonsense"]) == 2
    assert "--model: expected ID=SOURCE, got 'nonsense'" in capsys.readouterr().err
    assert main(["--model", "@cf/nope=x.safetensors"]) == 2
    assert "'@cf/nope' is not one of" in capsys.readouterr().err
    assert main(["--queue-size", "-1"]) == 2


def test_import_needs_no_server_extra_and_serve_says_what_to_install():
    code = ("import sys; sys.modules['starlette'] = sys.modules['uvicorn'] = None; import sd, sd.server; "
            "sys.exit(sd.server.main(['--port', '1']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "sd serve needs the server extra: pip install 'sd[server]'" in done.stderr


class FakeModels:
    """Records what the server passes on; fails on request."""

    def __init__(self, registry):
        self.registry, self.device, self.calls = registry, "cpu", []

    def generate(self, model_id, prompt, *, callback=None, **fields):
        self.calls.append((model_id, prompt, fields))
        if prompt == "boom":
            raise RuntimeError("secret internal detail /srv/weights")
        return Image.new("RGB", (8, 8), "red")


def test_in_process_fields_pass_through_and_500_is_generic(tmp_path):
    from starlette.testclient import TestClient

    from sd.models import Registry
    fake = FakeModels(Registry(tmp_path, {m: tmp_path for m in REGISTRY}))
    with TestClient(create_app(fake)) as c:
        assert c.post(f"/ai/run/{LCM}", json={"prompt": "a"}).status_code == 200
        png = picture(64, 64)
        body = {"prompt": "b", "negative_prompt": "n", "width": 512, "height": 256, "num_steps": 3, "strength": 1,
                "guidance": 2, "seed": 5, "image": list(png), "mask": list(png)}
        assert c.post(f"/ai/run/{LCM}", json=body).status_code == 200
        r = c.post(f"/ai/run/{LCM}", json={"prompt": "boom"})
        assert_envelope(r, 500, "internal error (see the server log, request ")
        assert "secret" not in r.text
    # omitted fields are not passed (the model's defaults apply); numbers arrive as the pipeline wants them
    assert fake.calls[0] == (LCM, "a", {})
    assert fake.calls[1][2] == {"negative_prompt": "n", "width": 512, "height": 256, "num_steps": 3, "strength": 1.0,
                                "guidance": 2.0, "seed": 5, "image": png, "mask": png}


def test_parse_input_is_strict_about_json_numbers():
    assert parse_input(b'{"prompt": "x", "guidance": 7, "strength": 0}') == {"prompt": "x", "guidance": 7.0}
    assert parse_input(b'{"prompt": "x", "guidance": 7, "strength": 0, "image_b64": "' +
                       base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))) + b'"}')["strength"] == 0.0


def test_the_workers_ai_docs_curl_call(server, tmp_path):
    """The README's curl call: Cloudflare's docs example with only the host changed (curl -d sends
    the form content type; the body is JSON all the same). The model's defaults apply: 1024x1024."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    out = tmp_path / "cat.png"
    command = (f'curl -s {server.url}/client/v4/accounts/$CLOUDFLARE_ACCOUNT_ID/ai/run/{SDXL} -X POST '
               f'-H "Authorization: Bearer $CLOUDFLARE_API_TOKEN" -d \'{{ "prompt": "cyberpunk cat" }}\' > {out}')
    env = {**os.environ, "CLOUDFLARE_ACCOUNT_ID": "0123abcd", "CLOUDFLARE_API_TOKEN": TOKEN}
    subprocess.run(command, shell=True, check=True, env=env, timeout=120)
    assert Image.open(out).size == (1024, 1024)
