"""`sd serve` over real HTTP: real server processes (tests/server_fixtures.py) serving tiny random-weight
models through `--model ID=SOURCE`, plus in-process servers where a test must control the worker or
write a model's files while the server runs. The limits (timeouts, slow clients, the queue) are in
tests/test_serve_limits.py."""

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from sd.registry import REGISTRY
from sd.serve.cli import main
from sd.serve.workers_ai import NO_ROUTE, code_of, to_job

pytest.register_assert_rewrite("server_fixtures")  # before the import below, which the plugin line then reuses
from server_fixtures import (IMG2IMG, INPAINT, LCM, LIGHTNING, PNG_SIGNATURE, REPO, SDXL, TOKEN,  # noqa: E402
                             InProcessServer, LogWatch, ServerProcess, broken_bodies, decode, docs_curl, mask_png,
                             picture, png_bytes, random_json, wait_until, write_sd15)

pytest_plugins = ["server_fixtures"]

SMALL = {"width": 256, "height": 256, "num_steps": 2, "seed": 1}
KEYS = ["prompt", "width", "height", "image", "mask", "seed", "num_steps", "zzz"]  # random JSON's field names


def run(client, model, body, prefix="/ai/run/", **kw) -> httpx.Response:
    # json.dumps escapes what httpx's json= can't send (a lone surrogate)
    return client.post(prefix + model, content=json.dumps(body), headers={"Content-Type": "application/json"}, **kw)


def assert_png(response, size=(256, 256)) -> bytes:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(PNG_SIGNATURE)
    assert Image.open(io.BytesIO(response.content)).size == size
    return response.content


def assert_envelope(response, status, *fragments) -> list[str]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"success", "errors", "messages", "result"}
    assert body["success"] is False and body["messages"] == [] and body["result"] is None
    assert body["errors"], body
    expected_code = NO_ROUTE if status == 404 and "no route" in response.text else code_of(status)
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
    keep = np.asarray(Image.open(io.BytesIO(mask))) == 0
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
    assert json.loads(body)["errors"][0]["code"] == code_of(413)


def test_missing_weights_503_and_healthz_says_so(busy):
    # --model pointing at a path that does not exist (yet)
    assert_envelope(run(busy, LCM, {"prompt": "x", **SMALL}), 503, f"{LCM}: no such file or folder",
                    "(given with --model)")
    # no override, and nothing in the (empty) weights dir: says which download fetches them
    assert_envelope(run(busy, LIGHTNING, {"prompt": "x", **SMALL}), 503, f"fetch them with: sd download {LIGHTNING}")
    # bad input still comes first
    assert_envelope(run(busy, LIGHTNING, {"prompt": ""}), 400)
    health = busy.get("/healthz")
    assert health.status_code == 503 and health.json()["ok"] is False
    assert health.json()["problems"] == [f"{LCM}: missing"]
    assert health.json()["models"][IMG2IMG] in ("ready", "loaded") and health.json()["models"][SDXL] == "not downloaded"


def test_a_model_whose_file_appears_later(tmp_path):
    """A --model source that isn't there at startup is served 503 until it is; one that appears
    but is no checkpoint is a 503 naming the model (the log names the file); one whose header
    looks right but whose weights don't load is a 500; /healthz is never ok for any of them."""
    from safetensors.torch import save_file
    from torch import zeros

    from sd.registry import Registry
    from sd.serve.cache import ModelCache
    path = tmp_path / "later.safetensors"
    server = InProcessServer(ModelCache(Registry(tmp_path / "weights", {IMG2IMG: path}), device="cpu"))
    log = LogWatch()
    try:
        def health():
            r = httpx.get(server.url + "/healthz", timeout=30)
            return r.status_code, r.json()["models"][IMG2IMG]

        url = f"{server.url}/ai/run/{IMG2IMG}"
        assert health() == (503, "missing")
        assert_envelope(httpx.post(url, json={"prompt": "x", **SMALL}), 503, "no such file or folder (given with --model)")
        path.write_bytes(b"<html>404 Not Found</html>" * 10)
        messages = assert_envelope(httpx.post(url, json={"prompt": "x", **SMALL}), 503,
                                   f"{IMG2IMG}: its weights are not a checkpoint sd can read (see the server log")
        assert str(tmp_path) not in messages[0]
        assert "not a safetensors file" in log.wait_for(messages[0].rsplit(" ", 1)[1].rstrip(")"))
        assert health() == (503, "unreadable")
        save_file({"model.diffusion_model.input_blocks.0.0.weight": zeros(1)}, str(path))
        messages = assert_envelope(httpx.post(url, json={"prompt": "x", **SMALL}), 500,
                                   f"{IMG2IMG}: the model's weights could not be loaded (see the server log, request ")
        assert str(tmp_path) not in messages[0]
        assert health() == (503, "failed to load")
        write_sd15(path)
        assert_png(httpx.post(url, json={"prompt": "x", **SMALL}, timeout=60))
        assert health() == (200, "loaded")
    finally:
        log.detach()
        server.stop()


def test_a_client_that_leaves_stops_its_2048_job_inside_a_step(server):
    """End to end on the real model: the client of a 2048x2048 job leaves while it runs; the
    worker stops it at a UNet or VAE checkpoint and is free for the next request."""
    body = json.dumps({"prompt": "big", "width": 2048, "height": 2048, "num_steps": 8}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST /ai/run/{IMG2IMG} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: httpx.get(server.url + "/healthz").json()["running"] == IMG2IMG, "running")
    line = wait_until(lambda: next((x for x in server.log().splitlines() if "size=2048x2048" in x), None), "logged")
    assert "status=499" in line
    ref = line.split(" id=")[1].split()[0]
    wait_until(lambda: f"request {ref}: stopped" in server.log(), "stopped")
    wait_until(lambda: httpx.get(server.url + "/healthz").json()["running"] is None, "idle")


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
    for i, body in enumerate(broken_bodies()):
        yield f"raw #{i} {body[:30]!r}", body, 400
    rng = np.random.default_rng(0)
    for i in range(60):
        yield f"random bytes #{i}", rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes(), 400
    for i in range(40):  # valid JSON, random structure; an unknown field keeps any of it from being valid
        value = random_json(rng, 4, KEYS)
        yield f"random JSON #{i}", json.dumps({**value, "zzz": 1} if isinstance(value, dict) else value).encode(), 400
    limit = 4 * 2 ** 20
    yield "oversize prompt", json.dumps({"prompt": "x" * limit}).encode(), 413
    yield "oversize image", json.dumps({**base, "image": [7] * (limit // 2)}).encode(), 413
    yield "oversize junk", b"{" * (limit + 1), 413


# ---------------------------------------------------------------- the other routes, logs, shutdown


def test_models_search(server, client, tiny_models):
    for path in ("/ai/models/search", "/client/v4/accounts/acc/ai/models/search"):
        r = client.get(path)
        body = r.json()
        assert body["success"] is True and body["errors"] == [] and body["messages"] == []
        assert [m["name"] for m in body["result"]] == list(REGISTRY)
        for entry, spec in zip(body["result"], REGISTRY.values()):
            assert entry["task"]["name"] == "Text-to-Image" and entry["present"] is True
            assert (entry["id"], entry["source"], entry["description"], entry["mode"]) == (
                spec.id, 1, spec.description, spec.mode)
            assert (entry["width"], entry["height"], entry["num_steps"]) == (
                spec.defaults["width"], spec.defaults["height"], spec.defaults["num_steps"])
        assert body["result_info"]["total_count"] == len(REGISTRY)
        # never a server path (the 500s hide them too)
        assert str(tiny_models["sd15"].parent) not in r.text and "safetensors" not in r.text

    def names(**params):
        return [m["name"] for m in client.get("/ai/models/search", params=params).json()["result"]]
    assert names(search="lightning") == [LIGHTNING]
    assert names(search="INPAINT") == [INPAINT]             # case-insensitive, name or description
    assert names(search="repaint the white") == [INPAINT]   # in the description only
    assert names(task="Text-to-Image") == names(task="text-to-image") == list(REGISTRY)
    assert names(task="Text Generation") == [] and names(search="llama") == []
    assert names(author="runwayml") == [IMG2IMG, INPAINT] and names(author="meta") == []
    assert names(source="1") == list(REGISTRY) and names(source="2") == []
    assert names(hide_experimental="true") == list(REGISTRY)
    assert names(search="stable", page="2", per_page="2") == [IMG2IMG, INPAINT]
    assert client.get("/ai/models/search", params={"search": "xl"}).json()["result_info"]["total_count"] == 2
    assert_envelope(client.get("/ai/models/search", params={"page": "x"}), 400, "page: must be an integer")
    assert_envelope(client.get("/ai/models/search", params={"serch": "x"}), 400,
                    "serch: not a parameter of the model search")


def test_healthz(client, busy):
    run(client, IMG2IMG, {"prompt": "x", **SMALL})
    r = client.get("/healthz")
    body = r.json()
    assert r.status_code == 200 and body["ok"] is True and body["problems"] == []
    assert body["queue"] == 0 and body["queue_size"] == 32 and body["running"] is None
    assert IMG2IMG in body["loaded"] and body["device"] == "cpu" and body["models"][IMG2IMG] == "loaded"
    assert busy.get("/healthz").json()["queue_size"] == 1


def log_line(server, request_id: str) -> str:
    return wait_until(lambda: next((x for x in server.log().splitlines() if f" id={request_id} " in x), None),
                      f"logged {request_id}")


def test_one_log_line_per_request(server, client):
    ok = run(client, IMG2IMG, {"prompt": "logged", **SMALL, "seed": 99})
    bad = run(client, IMG2IMG, {"prompt": ""})
    health = client.get("/healthz")
    assert log_line(server, ok.headers["x-request-id"]).endswith(
        f"POST /ai/run/{IMG2IMG} id={ok.headers['x-request-id']} model={IMG2IMG} size=256x256 steps=2 status=200 "
        + log_line(server, ok.headers["x-request-id"]).rsplit(" ", 1)[1])
    assert f" model={IMG2IMG} size=- steps=- status=400 " in log_line(server, bad.headers["x-request-id"])
    assert "GET /healthz" in log_line(server, health.headers["x-request-id"])
    assert not any("Traceback" in line for line in server.log().splitlines())


def test_every_client_field_is_escaped_in_the_log(server):
    """CR, LF, ESC, NUL or a space in a model id (or anywhere in the path) must not forge a log
    line or a field, or colour a terminal. (LF ends the route's match: that one is a no-route 404.)"""
    def send(path: str) -> str:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 404")
        return log_line(server, reply.split(b"x-request-id: ")[1].split(b"\r\n")[0].decode())

    line = send("/ai/run/x%0DFAKE%201.2.3.4%1B[31m%00%20y")
    assert " model=x\\rFAKE\\x201.2.3.4\\x1b[31m\\x00\\x20y size=- steps=- status=404 " in line
    line = send("/ai/run/a%0AFAKE%20LINE")
    assert " POST /ai/run/a\\nFAKE\\x20LINE id=" in line
    raw = server.log_path.read_bytes()
    assert not any(c in raw for c in (b"\r", b"\x1b", b"\x00")) and b"\nFAKE" not in raw


def test_the_seed_comes_back(client):
    """No seed asked: the image says which one it used (X-Seed, and the PNG's settings as
    `sd generate` writes them), and asking for it makes the same image."""
    r = run(client, IMG2IMG, {"prompt": "a seed", "width": 256, "height": 256, "num_steps": 2})
    png = assert_png(r)
    seed = int(r.headers["x-seed"])
    info = Image.open(io.BytesIO(png)).info
    settings = json.loads(info["sd"])
    assert settings["seed"] == seed and settings["model"] == IMG2IMG and settings["prompt"] == "a seed"
    assert f"Seed: {seed}, Size: 256x256, Model: {IMG2IMG}" in info["parameters"]
    again = run(client, IMG2IMG, {"prompt": "a seed", "width": 256, "height": 256, "num_steps": 2, "seed": seed})
    assert again.headers["x-seed"] == str(seed) and assert_png(again) == png


def test_sigterm_finishes_the_running_request_and_exits_0(tiny_models, tmp_path):
    srv = ServerProcess(["--model", f"{IMG2IMG}={tiny_models['sd15']}", "--weights-dir", str(tmp_path)],
                        tmp_path / "log").wait_ready()
    try:
        url = f"{srv.url}/ai/run/{IMG2IMG}"
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url, json={"prompt": "x", "width": 512, "height": 512,
                                                         "num_steps": 20}, timeout=120)
            wait_until(lambda: httpx.get(srv.url + "/healthz").json()["running"] is not None, "running")
            waiting = pool.submit(httpx.post, url, json={"prompt": "y", **SMALL}, timeout=120)
            wait_until(lambda: httpx.get(srv.url + "/healthz").json()["queue"] == 1, "waiting")
            srv.proc.send_signal(signal.SIGTERM)
            assert_png(running.result(), size=(512, 512))
            # it was waiting: answered, not dropped
            assert_envelope(waiting.result(), 503, "the server is shutting down")
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    assert "Shutting down" in srv.log()


# ---------------------------------------------------------------- command line and in-process


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "argument --port: must be a whole number in [1, 65535], got '99999'"),
    (["--port", "0"], "argument --port: must be a whole number in [1, 65535], got '0'"),
    (["--port", "http"], "argument --port: must be a whole number in [1, 65535], got 'http'"),
    (["--max-body-mb", "nan"], "argument --max-body-mb: must be a number in (0, 4096], got 'nan'"),
    (["--max-body-mb", "0"], "argument --max-body-mb: must be a number in (0, 4096], got '0'"),
    (["--timeout", "nan"], "argument --timeout: must be a number in [0, 604800], got 'nan'"),
    (["--timeout", "inf"], "argument --timeout: must be a number in [0, 604800], got 'inf'"),
    (["--timeout", "-1"], "argument --timeout: must be a number in [0, 604800], got '-1'"),
    (["--cache-gb", "-5"], "argument --cache-gb: must be a number in (0, 1e+06], got '-5'"),
    (["--cache-gb", "nan"], "argument --cache-gb: must be a number in (0, 1e+06], got 'nan'"),
    (["--queue-size", "-1"], "argument --queue-size: must be a whole number in [0, 100000], got '-1'"),
    (["--queue-size", "1.5"], "argument --queue-size: must be a whole number in [0, 100000], got '1.5'"),
    (["--read-timeout", "0"], "argument --read-timeout: must be a number in (0, 3600], got '0'"),
    (["--max-connections", "0"], "argument --max-connections: must be a whole number in [1, 100000], got '0'"),
    (["--model", "nonsense"], "--model: expected ID=SOURCE, got 'nonsense'"),
    (["--model", "@cf/nope=x.safetensors"], "model: '@cf/nope' is not one of"),
    (["--api-token", " "], "--api-token: empty"),
])
def test_bad_flags_are_one_line_errors(capsys, flags, message):
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_startup_refuses_what_cannot_work(tiny_models, tmp_path, capsys):
    """A device this machine lacks, or a model source that is no checkpoint (read from headers):
    one line and exit 2, before listening. A source not there yet is not refused (served 503)."""
    import torch
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}: not usable on this machine (") and err.count("\n") == 1
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_models["sd15"].read_bytes()[:-1000])
    no_unet = tmp_path / "vae-only.safetensors"
    from safetensors.torch import save_file
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(no_unet))
    for source, problem in ((tiny_models["corrupt"], "not a safetensors file"),
                            (tiny_models["no_index"], "model_index.json missing"),
                            (truncated, "truncated (the header describes"), (no_unet, "holds no UNet")):
        assert main(["--weights-dir", str(tmp_path), "--model", f"{LCM}={source}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {LCM} (given with --model): {source}") and problem in err, err
        assert err.count("\n") == 1


def test_import_needs_no_server_extra_and_serve_says_what_to_install():
    code = ("import sys; sys.modules['starlette'] = sys.modules['uvicorn'] = None; import sd, sd.serve.cli; "
            "sys.exit(sd.serve.cli.main(['--port', '1']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "sd serve needs the server extra: pip install 'sd[server]'" in done.stderr


def test_fields_pass_through_and_only_input_errors_are_400(tmp_path):
    """What reaches Pipeline.generate, and how its exceptions are answered: sd.errors.InputError is
    the client's 400 with its message; any other exception, a plain ValueError from deep inside
    (PIL, numpy) included, is a generic 500 with the details in the log only."""
    from sd.errors import InputError
    from sd.weights import CheckpointError
    from server_fixtures import fake_cache
    cache = fake_cache(tmp_path)
    server, log = InProcessServer(cache), LogWatch()
    try:
        url = f"{server.url}/ai/run/{LCM}"
        assert httpx.post(url, json={"prompt": "a"}).status_code == 200
        png = picture(64, 64)
        body = {"prompt": "b", "negative_prompt": "n", "width": 512, "height": 256, "num_steps": 3, "strength": 1,
                "guidance": 2, "seed": 5, "image": list(png), "mask": list(png)}
        assert httpx.post(url, json=body).status_code == 200
        fake = cache.fakes[LCM]
        # omitted fields are not passed (the model's defaults apply); numbers arrive as the pipeline wants them
        assert fake.calls[0] == {}
        assert fake.calls[1] == {"negative_prompt": "n", "width": 512, "height": 256, "num_steps": 3,
                                 "strength": 1.0, "guidance": 2.0, "seed": 5, "image": png, "mask": png}
        fake.fail = InputError("width: must be a positive multiple of 8, got 260")
        assert_envelope(httpx.post(url, json={"prompt": "c"}), 400, "width: must be a positive multiple of 8, got 260")
        for deep in (ValueError("operands could not be broadcast together /srv/secret"),
                     CheckpointError("/srv/weights/x.safetensors: missing keys"), RuntimeError("secret /srv")):
            fake.fail = deep
            r = httpx.post(url, json={"prompt": "d"})
            messages = assert_envelope(r, 500, "internal error (see the server log, request ")
            assert "secret" not in r.text and "/srv" not in r.text
            assert messages == [f"internal error (see the server log, request {r.headers['x-request-id']})"]
            assert str(deep) in log.wait_for(f"request {r.headers['x-request-id']}: {LCM} failed") + \
                "".join(log.lines)
    finally:
        log.detach()
        server.stop()


def test_to_job_is_strict_about_json_numbers():
    assert to_job(IMG2IMG, b'{"prompt": "x", "guidance": 7, "strength": 0}').kwargs == {"prompt": "x", "guidance": 7.0}
    job = to_job(IMG2IMG, b'{"prompt": "x", "guidance": 7, "strength": 0, "image_b64": "' +
                 base64.b64encode(png_bytes(np.zeros((8, 8, 3), np.uint8))) + b'"}')
    assert job.kwargs["strength"] == 0.0 and (job.kwargs["width"], job.kwargs["height"]) == (8, 8)


def test_an_image_over_2048_gives_sides_that_fit():
    """Sides left out come from the image, scaled down to the schema's 2048 when it is larger."""
    wide = png_bytes(np.zeros((1000, 3000, 3), np.uint8))
    job = to_job(IMG2IMG, json.dumps({"prompt": "x", "image": list(wide)}).encode())
    assert (job.kwargs["width"], job.kwargs["height"]) == (2048, 680)
    job = to_job(IMG2IMG, json.dumps({"prompt": "x", "image": list(wide), "height": 512}).encode())
    assert (job.kwargs["width"], job.kwargs["height"]) == (2048, 512)


def test_the_workers_ai_docs_curl_call(server, tmp_path):
    """The README's curl call: Cloudflare's docs example with only the host changed. The model's
    defaults apply: 1024x1024."""
    out = tmp_path / "cat.png"
    docs_curl(server.url, SDXL, out, timeout=120)
    assert Image.open(out).size == (1024, 1024)
