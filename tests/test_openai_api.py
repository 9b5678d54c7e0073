"""The OpenAI Images API dialect (sd/serve/openai.py) with the official `openai` Python client as
the client: against a real `sd serve` process on tiny random-weight models (tests/server_fixtures.py),
and in process where a test must decide how a job ends (a fake pipeline) or what the clock says.
Then its schema, its multipart reader and its URL store on their own, and a fuzz of several
hundred generated bad bodies, each of which must be a 4xx in OpenAI's envelope."""

import base64
import collections
import io
import json
import os
import re
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sd.registry import REGISTRY
from sd.serve import multipart
from sd.serve.cli import main
from sd.serve.image_files import ImageFiles
from sd.serve.jobs import RequestError
from sd.serve.openai import EDITS, GENERATION_FIELDS, GENERATIONS, Dialect

pytest.register_assert_rewrite("server_fixtures")  # before the import below, which the plugin line then reuses
from server_fixtures import (IMG2IMG, INPAINT, LCM, SDXL, TOKEN, InProcessServer, LogWatch, decode,  # noqa: E402
                             fake_cache, picture, png_bytes, wait_until)

pytest_plugins = ["server_fixtures"]

README = Path(__file__).resolve().parent.parent / "README.md"
FAST = {"num_steps": 2}  # sd's own field, sent with the client's extra_body


def client_for(server, token=TOKEN, **kw) -> openai.OpenAI:
    # max_retries=0: the client retries 429 and 5xx by itself, which would hide what the server said
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=token, max_retries=kw.pop("max_retries", 0),
                         timeout=60, **kw)


def pixels(item) -> np.ndarray:
    return decode(base64.b64decode(item.b64_json))


def settings_of(item) -> dict:
    return json.loads(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).info["sd"])


def rgba(array: np.ndarray) -> bytes:
    return png_bytes(array.astype(np.uint8))


def clear_middle(width=256, height=256, base=None) -> np.ndarray:
    """An RGBA picture (random, or `base`) whose middle is fully transparent: OpenAI's 'edit here'."""
    rgb = base if base is not None else np.random.default_rng(0).integers(0, 256, (height, width, 3))
    alpha = np.full((height, width, 1), 255)
    alpha[height // 4:3 * height // 4, width // 4:3 * width // 4] = 0
    return np.concatenate([rgb, alpha], axis=2)


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return client_for(server)


# ---------------------------------------------------------------- generations


def test_generate_b64_is_the_workers_ai_picture(server, oa):
    """The same settings through either dialect make the same PNG, settings chunk and all."""
    r = oa.images.generate(model=LCM, prompt="a red circle", size="256x256", extra_body={**FAST, "seed": 5})
    assert r.size == "256x256" and r.output_format == "png" and r.background == "opaque" and r.created > 0
    assert len(r.data) == 1 and r.data[0].seed == 5 and r.data[0].url is None
    png = base64.b64decode(r.data[0].b64_json)
    direct = httpx.post(f"{server.url}/ai/run/{LCM}", headers=server.headers, timeout=60,
                        json={"prompt": "a red circle", "width": 256, "height": 256, "num_steps": 2, "seed": 5})
    assert direct.status_code == 200 and direct.content == png


def test_n_3_gives_three_pictures_and_their_seeds(oa):
    r = oa.images.generate(model=LCM, prompt="a cat", size="256x256", n=3, extra_body=FAST)
    seeds = [item.seed for item in r.data]
    assert len(seeds) == 3 and seeds == list(range(seeds[0], seeds[0] + 3))
    arrays = [pixels(item) for item in r.data]
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])
    assert [settings_of(item)["seed"] for item in r.data] == seeds
    # a reported seed makes its picture again, alone: to within a level, as a batch's sums on a CPU
    # are not bit for bit a single picture's (tests/test_generate_api.py, BATCH_LEVELS)
    again = oa.images.generate(model=LCM, prompt="a cat", size="256x256", extra_body={**FAST, "seed": seeds[1]})
    assert np.abs(pixels(again.data[0]).astype(int) - arrays[1]).max() <= 1
    assert np.abs(arrays[0].astype(int) - arrays[1]).max() > 10


def test_url_results_are_served_for_a_while_without_a_token(server):
    """The URL names the host the client called (here `localhost`, not 127.0.0.1) and needs no
    token: its unguessable name is the credential, as in OpenAI's signed URLs."""
    local = openai.OpenAI(base_url=f"http://localhost:{server.port}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    r = local.images.generate(model=LCM, prompt="a cat", size="256x256", response_format="url", n=2,
                              extra_body={**FAST, "seed": 9})
    assert [item.b64_json for item in r.data] == [None, None] and [item.seed for item in r.data] == [9, 10]
    for item in r.data:
        assert re.fullmatch(rf"http://localhost:{server.port}/v1/images/files/[A-Za-z0-9_-]{{32}}\.png", item.url)
        got = httpx.get(item.url, timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert int(got.headers["cache-control"].split("max-age=")[1]) <= 600
        assert json.loads(Image.open(io.BytesIO(got.content)).info["sd"])["seed"] == item.seed
    gone = httpx.get(r.data[0].url[:-8] + "xxxx.png", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["message"].endswith(
        "no such picture (pictures asked for as a URL are kept 600 s)")


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format_and_compression(oa, fmt, pil_format):
    sizes = []
    for compression in (10, 95):
        r = oa.images.generate(model=LCM, prompt="a cat", size="256x256", output_format=fmt,
                               output_compression=compression, extra_body={**FAST, "seed": 3})
        data = base64.b64decode(r.data[0].b64_json)
        image = Image.open(io.BytesIO(data))
        assert image.format == pil_format and image.size == (256, 256) and r.output_format == fmt
        sizes.append(len(data))
    assert sizes[0] < sizes[1]  # the quality was honoured


def test_the_default_model(server, busy_server):
    """No `model`: the first registry model whose weights are here (on the busy server only the
    img2img entry has its weights)."""
    r = client_for(server).images.generate(prompt="a cat", size="256x256", extra_body={"num_steps": 1})
    assert settings_of(r.data[0])["model"] == next(iter(REGISTRY)) == SDXL
    r = client_for(busy_server, token="anything").images.generate(prompt="a cat", size="256x256",
                                                                   extra_body={"num_steps": 1})
    assert settings_of(r.data[0])["model"] == IMG2IMG


def test_models_list_and_retrieve(server, busy_server, oa):
    assert [m.id for m in oa.models.list()] == list(REGISTRY)
    model = oa.models.retrieve(LCM)
    assert (model.id, model.object, model.owned_by) == (LCM, "model", "lykon")
    busy = client_for(busy_server, token="anything")
    assert [m.id for m in busy.models.list()] == [IMG2IMG]  # the others' weights are not there
    with pytest.raises(openai.NotFoundError) as e:
        busy.models.retrieve(LCM)
    assert e.value.param == "model" and e.value.code == "model_not_found"


# ---------------------------------------------------------------- edits


def test_edit_with_a_mask_repaints_its_transparent_pixels(oa):
    source = picture(seed=7)
    mask = rgba(clear_middle())  # its colours are noise: only its alpha counts
    r = oa.images.edit(model=INPAINT, image=("photo.png", source, "image/png"), mask=("mask.png", mask, "image/png"),
                       prompt="a cat", extra_body={**FAST, "seed": 1})
    got, before = pixels(r.data[0]), decode(source)
    keep = clear_middle()[..., 3] == 255
    assert r.size == "256x256"
    assert np.array_equal(got[keep], before[keep])  # the inpainting model keeps what it may not touch
    assert not np.array_equal(got[~keep], before[~keep])


def test_edits_are_the_workers_ai_jobs(server, oa):
    """Without a mask, an opaque picture is edited whole (strength 0.8), and a picture with
    transparent pixels has them repainted (DALL-E 2's convention): each the same PNG as Workers AI
    makes from the same image, mask and settings."""
    source = picture(320, 256, seed=4)
    whole = oa.images.edit(model=IMG2IMG, image=("photo.png", source, "image/png"), prompt="a cat",
                           extra_body={"num_steps": 3, "seed": 2})
    assert whole.size == "320x256"
    body = {"prompt": "a cat", "num_steps": 3, "seed": 2, "image": list(source), "strength": 0.8}
    direct = httpx.post(f"{server.url}/ai/run/{IMG2IMG}", json=body, headers=server.headers, timeout=60)
    assert base64.b64decode(whole.data[0].b64_json) == direct.content

    holed = rgba(clear_middle(base=decode(picture(seed=8))))
    own = oa.images.edit(model=INPAINT, image=("photo.png", holed, "image/png"), prompt="a cat",
                         extra_body={**FAST, "seed": 2})
    white_where_clear = png_bytes(np.where(clear_middle()[..., 3] == 0, 255, 0).astype(np.uint8))
    body = {"prompt": "a cat", **FAST, "seed": 2, "image": list(holed), "mask": list(white_where_clear)}
    direct = httpx.post(f"{server.url}/ai/run/{INPAINT}", json=body, headers=server.headers, timeout=60)
    assert base64.b64decode(own.data[0].b64_json) == direct.content


def test_edit_sizes_n_and_a_list_of_one_image(oa):
    source = picture(seed=5)
    r = oa.images.edit(model=IMG2IMG, image=[("a.png", source, "image/png")], prompt="a cat", n=2, size="256x320",
                       extra_body=FAST)
    assert r.size == "256x320" and len(r.data) == 2 and r.data[1].seed == r.data[0].seed + 1
    assert all(Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size == (256, 320) for d in r.data)


@pytest.mark.parametrize("kwargs, param, fragment", [
    (dict(image=[("a.png", picture(), "image/png")] * 2), "image", "image: one picture only (sd edits one at a "
                                                                  "time), got 2"),
    (dict(mask=("m.png", picture(), "image/png")), "mask", "mask: has no alpha channel; the pixels to edit are the "
                                                           "fully transparent ones (alpha 0)"),
    (dict(mask=("m.png", rgba(np.full((256, 256, 4), 255)), "image/png")), "mask", "mask: no pixel is fully "
                                                                                   "transparent"),
    (dict(mask=("m.png", rgba(clear_middle(128, 128)), "image/png")), "mask", "mask: must be the image's size, "
                                                                              "256x256, got 128x128"),
    (dict(image=("a.png", b"not a picture", "image/png")), "image", "image: not a readable image"),
    (dict(input_fidelity="high"), "input_fidelity", 'input_fidelity: invalid value "high"; supported here: "low"'),
    (dict(n=0), "n", "n: must be an integer in [1, 10], got 0"),
])
def test_edit_errors_name_the_field(oa, kwargs, param, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.edit(**{"model": IMG2IMG, "image": ("a.png", picture(), "image/png"), "prompt": "a cat", **kwargs})
    assert e.value.param == param and e.value.code == "invalid_value" and e.value.type == "invalid_request_error"
    assert fragment in e.value.message


# ---------------------------------------------------------------- errors, as the client's exceptions


@pytest.mark.parametrize("kwargs, param, code, fragment", [
    (dict(size="1000x7"), "size", "invalid_value", 'size: must be "auto" or "WIDTHxHEIGHT", each side a multiple '
                                                   'of 8 in [256, 2048] (e.g. "1024x1024"), got "1000x7"'),
    (dict(size="260x256", n=11), "n", "invalid_value", "n: must be an integer in [1, 10], got 11; size: must be"),
    (dict(quality="hd"), "quality", "invalid_value", 'quality: invalid value "hd"; supported here: "auto", '
                                                     '"standard"'),
    (dict(background="transparent"), "background", "invalid_value", "sd's pictures have no transparency"),
    (dict(style="natural"), "style", "invalid_value", "describe the style in the prompt"),
    (dict(output_format="gif"), "output_format", "invalid_value", "GIF and SVG are not formats sd writes"),
    (dict(output_compression=50), "output_compression", "invalid_value", "only for output_format jpeg or webp"),
    (dict(stream=True), "stream", "invalid_value", "sd answers when the pictures are done"),
    (dict(frame_count=4), "frame_count", "invalid_value", "frame_count: not supported: sd makes no GIFs"),
    (dict(extra_body={"steps": 3}), "steps", "unknown_parameter", "steps: unknown parameter (accepted: prompt, model"),
    (dict(prompt=""), "prompt", "invalid_value", "prompt: must be a string of 1 to 32000 characters, got \"\""),
    (dict(extra_body={"num_steps": True}), "num_steps", "invalid_value", "num_steps: must be an integer in [1, 150], "
                                                                         "got true"),
])
def test_bad_generations_are_bad_request_errors(oa, kwargs, param, code, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.generate(**{"model": LCM, "prompt": "x", **kwargs})
    assert (e.value.param, e.value.code, e.value.type) == (param, code, "invalid_request_error")
    assert fragment in e.value.message and "Traceback" not in e.value.response.text


def test_missing_prompt_and_the_cores_own_checks(server, oa):
    r = httpx.post(f"{server.url}/v1/images/generations", headers=server.headers, json={"model": LCM})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "prompt: required (a string of 1 to 32000 characters)", "type": "invalid_request_error",
        "param": "prompt", "code": "missing_required_parameter"}
    # the inpainting model needs a mask: said by the core, after the schema, in the same envelope
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.generate(model=INPAINT, prompt="x", size="256x256")
    assert e.value.param == "image" and "image: required by " + INPAINT in e.value.message


def test_auth_not_found_and_missing_weights(server, busy_server, oa):
    for token in ("wrong", TOKEN + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            client_for(server, token=token).images.generate(model=LCM, prompt="x")
        assert (e.value.code, e.value.type, e.value.message) == (
            "invalid_api_key", "invalid_request_error", "Error code: 401 - authorization: wrong API token")
    with pytest.raises(openai.AuthenticationError):
        client_for(server).models.list(extra_headers={"Authorization": ""})
    with pytest.raises(openai.NotFoundError) as e:
        oa.images.generate(model="dall-e-3", prompt="x")
    assert e.value.param == "model" and e.value.code == "model_not_found" and "'dall-e-3' is not one of" in str(e.value)
    with pytest.raises(openai.InternalServerError) as e:  # 503: weights missing, said how to fetch them
        client_for(busy_server, token="none").images.generate(model=SDXL, prompt="x")
    assert e.value.status_code == 503 and f"fetch them with: sd download {SDXL}" in e.value.message
    r = httpx.get(f"{server.url}/v1/nowhere", headers=server.headers)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route for GET /v1/nowhere"
    r = httpx.get(f"{server.url}{GENERATIONS}", headers=server.headers)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}{GENERATIONS}", headers=server.headers, content=b"{" * (5 * 2 ** 20))
    assert r.status_code == 413 and "body: larger than the server's limit" in r.json()["error"]["message"]


def test_one_log_line_per_request(server, oa):
    r = oa.images.with_raw_response.generate(model=LCM, prompt="logged", size="256x256", extra_body=FAST)
    ref = r.headers["x-request-id"]
    line = wait_until(lambda: next((x for x in server.log().splitlines() if f" id={ref} " in x), None), "logged")
    assert f"POST /v1/images/generations id={ref} model={LCM} size=256x256 steps=2 status=200 " in line


def test_rate_limit_server_errors_and_timeouts_in_process(tmp_path):
    """With a fake pipeline the test decides how a job ends: a full queue is the client's
    RateLimitError, a failure deep inside a 500 that names only the request id, and a job past
    the timeout a 504 that the client does not retry (x-should-retry: false)."""
    cache = fake_cache(tmp_path, release=False)
    server = InProcessServer(cache, queue_size=0)
    try:
        oa = client_for(server, token="none")
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(oa.images.generate, model=LCM, prompt="first")
            wait_until(lambda: LCM in cache.fakes and cache.fakes[LCM].started.is_set(), "running")
            with pytest.raises(openai.RateLimitError) as e:
                oa.images.generate(model=LCM, prompt="second")
            assert (e.value.code, e.value.type) == ("rate_limit_exceeded", "requests")
            assert e.value.response.headers["retry-after"] == "1"
            cache.fakes[LCM].release.set()
            assert first.result().data[0].seed == 12345
        cache.fakes[LCM].fail = RuntimeError("secret /srv/weights")
        with pytest.raises(openai.InternalServerError) as e:
            oa.images.generate(model=LCM, prompt="x")
        assert e.value.type == "server_error" and "secret" not in e.value.response.text
        assert e.value.message.endswith(f"internal error (see the server log, request "
                                        f"{e.value.response.headers['x-request-id']})")
    finally:
        for fake in cache.fakes.values():
            fake.release.set()
        server.stop()
    cache = fake_cache(tmp_path, release=False)
    server = InProcessServer(cache, timeout=0.5)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client_for(server, token="none", max_retries=2).images.generate(model=LCM, prompt="slow")
        assert e.value.status_code == 504 and e.value.response.headers["x-should-retry"] == "false"
        assert cache.fakes[LCM].prompts == ["slow"]  # tried once: the client's two retries did not happen
    finally:
        server.stop()


def test_a_client_that_leaves_stops_its_job(tmp_path):
    cache = fake_cache(tmp_path, release=False)
    server, log = InProcessServer(cache), LogWatch()
    try:
        body = json.dumps({"model": LCM, "prompt": "x", "size": "256x256", "n": 2}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"POST {GENERATIONS} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: LCM in cache.fakes and cache.fakes[LCM].started.is_set(), "running")
        assert cache.fakes[LCM].stopped.wait(60)  # stopped where it ran, not finished
        line = log.wait_for("status=499")
        assert f"POST {GENERATIONS} " in line and f"model={LCM} size=256x256 " in line
    finally:
        log.detach()
        server.stop()


def test_kept_pictures_expire_and_the_public_url(tmp_path):
    now = [0.0]
    server = InProcessServer(fake_cache(tmp_path))
    try:
        server.service.image_files = ImageFiles(ttl=60, public_url="https://images.example/sd/", clock=lambda: now[0])
        r = client_for(server, token="none").images.generate(model=LCM, prompt="x", response_format="url")
        url = r.data[0].url
        assert url.startswith("https://images.example/sd/v1/images/files/")
        local = server.url + url.removeprefix("https://images.example/sd")
        assert httpx.get(local).status_code == 200
        now[0] = 60.0
        gone = httpx.get(local)
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "invalid_request_error"
        server.service.image_files = ImageFiles(ttl=0)
        with pytest.raises(openai.BadRequestError) as e:
            client_for(server, token="none").images.generate(model=LCM, prompt="x", response_format="url")
        assert 'response_format: "url" is off on this server (--url-ttl 0); use "b64_json"' in e.value.message
    finally:
        server.stop()


# ---------------------------------------------------------------- the parts on their own


def test_the_url_store_bounds_its_bytes_and_expires():
    now = [0.0]
    files = ImageFiles(ttl=10, max_bytes=250, clock=lambda: now[0])
    names = [files.put(bytes([i]) * 100, "png") for i in range(3)]
    assert files.get(names[0]) is None  # 300 bytes > 250: the oldest went first
    assert files.get(names[1])[0].data == bytes([1]) * 100 and files.get(names[1])[1] == 10
    big = files.put(b"x" * 1000, "webp")  # larger than the bound alone: kept, the others dropped
    assert files.get(names[2]) is None and files.get(big)[0].media_type == "image/webp"
    now[0] = 10.0
    assert files.get(big) is None
    assert len({files.put(b"", "png") for _ in range(100)}) == 100


def job(body, content_type="application/json", path=GENERATIONS, registry=None):
    class AllHere:
        def missing(self, model):
            return []
    return Dialect(path, registry or AllHere(), ImageFiles(), "http://127.0.0.1:8000/").to_job(None, body,
                                                                                               content_type)


def form(fields: dict, files: list = ()) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type: text fields, then (name, (filename, data)) files."""
    parts = [(f'name="{name}"', value.encode()) for name, value in fields.items()]
    parts += [(f'name="{name}"; filename="{filename}"', data) for name, (filename, data, *_) in files]
    body = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; {head}\r\n\r\n".encode() + data + b"\r\n"
                    for head, data in parts)
    return body + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


BOUNDARY = "sd-test-3f9a1c"


def test_the_schema_in_process():
    # null is a field left out; what reaches the pipeline
    assert job(b'{"prompt": "x", "n": null, "size": null, "model": null, "seed": 3}').kwargs == {
        "prompt": "x", "num_images": 1, "seed": 3}
    assert job(b'{"prompt": "x", "size": "auto", "model": "' + LCM.encode() + b'"}').model == LCM
    assert job(b'{"prompt": "x", "size": "512x768", "n": 4}').kwargs == {
        "prompt": "x", "num_images": 4, "width": 512, "height": 768}
    assert job(b'{"prompt": "x", "stream": false, "partial_images": 0, "quality": "auto", "user": "u", '
               b'"moderation": "low", "background": "opaque", "style": "vivid"}').kwargs == {"prompt": "x",
                                                                                            "num_images": 1}
    # the default model is the first one here
    class OnlyLCM:
        def missing(self, model):
            return [] if model == LCM else ["x"]
    assert job(b'{"prompt": "x"}', registry=OnlyLCM()).model == LCM
    for body, message in [(b'{"prompt": "x", "n": 2.0}', "n: must be an integer in [1, 10], got 2.0"),
                          (b'{"prompt": "x", "n": true}', "n: must be an integer in [1, 10], got true"),
                          (b'{"prompt": "x", "stream": 0}', 'stream: invalid value 0; supported here: false'),
                          (b'{"prompt": "x", "partial_images": false}', "partial_images: invalid value false"),
                          (b'{"prompt": null}', "prompt: must be a string of 1 to 32000 characters, got null"),
                          (b'{"prompt": "x", "user": null}', "user: must be a string of 0 to 32000 characters"),
                          (b'{"prompt": "\\ud800"}', "prompt: must be valid Unicode text"),
                          (b'{"prompt": "x", "size": "256X256"}', 'size: must be "auto" or "WIDTHxHEIGHT"'),
                          (b'{"prompt": "x", "size": " 256x256"}', 'size: must be "auto" or "WIDTHxHEIGHT"'),
                          (b'{"prompt": "x", "seed": 18446744073709551616}', "seed: must be an integer in [0, "
                                                                             "18446744073709551615]"),
                          (b'[]', "body: must be a JSON object, got an array of 0 items"),
                          (b'{"prompt": "x", "guidance": NaN}', "body: not valid JSON: NaN is not a number JSON "
                                                                "allows")]:
        with pytest.raises(RequestError) as e:
            job(body)
        assert message in "; ".join(e.value.messages), (body, e.value.messages)


def test_edit_fields_arrive_as_text_in_process():
    image = picture(64, 64)
    body, content_type = form({"prompt": "x", "n": "2", "size": "", "guidance": "3.5", "stream": "false",
                               "strength": "0.25", "user": ""}, [("image[]", ("a.png", image))])
    assert job(body, content_type, EDITS).kwargs == {"prompt": "x", "num_images": 2, "guidance": 3.5, "strength": 0.25,
                                                     "image": image, "width": 64, "height": 64}
    for fields, files, message in [
        ({"prompt": "x"}, [], "image: required (one PNG, JPEG or WebP file)"),
        ({"prompt": "x", "image": "not a file"}, [], "image: must be a file (a part with a filename)"),
        ({"prompt": "x", "n": "two"}, [("image", ("a.png", image))], 'n: must be an integer in [1, 10], got "two"'),
        ({"prompt": "x", "n": "\u0661"}, [("image", ("a.png", image))], "n: must be an integer"),  # not ASCII
        ({"prompt": "x", "stream": "yes"}, [("image", ("a.png", image))], 'stream: invalid value "yes"'),
        ({"prompt": "x", "guidance": "1e999"}, [("image", ("a.png", image))], 'guidance: must be a number in '
                                                                              '[0, 100], got "1e999"'),
        ({}, [("image", ("a.png", image)), ("prompt", ("p.txt", b"x"))], "prompt: must be a plain field"),
        ({"prompt": "x", "n": "1"}, [("image", ("a.png", image)), ("n", ("n.txt", b"1"))], "n: given more than once"),
        ({"prompt": "x"}, [("image", ("a.png", image)), ("markup", ("m.png", image))], "markup: not supported"),
        ({"prompt": "x", "svg[model]": "m"}, [("image", ("a.png", image))], "svg[model]: unknown parameter"),
    ]:
        with pytest.raises(RequestError) as e:
            job(*form(fields, files), path=EDITS)
        assert message in "; ".join(e.value.messages), (fields, e.value.messages)
    with pytest.raises(RequestError, match="Content-Type: must be multipart/form-data, got 'application/json'"):
        job(b'{"prompt": "x"}', path=EDITS)


@pytest.mark.parametrize("body, message", [
    (b"no boundary here", "no part begins with the boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1", "ends before the closing boundary"),
    (b"--bx\r\n", "a boundary line must end with CRLF"),
    (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n1\r\n--b--", "its headers do not end with an empty line"),
    (b"--b\r\nbroken header\r\n\r\n1\r\n--b--", "'broken header' is not a `Name: value` header"),
    (b"--b\r\nContent-Type: text/plain\r\n\r\n1\r\n--b--", "part 1: no Content-Disposition header"),
    (b"--b\r\nContent-Disposition: attachment; name=a\r\n\r\n1\r\n--b--", "must be form-data with a name"),
    (b"--b\r\nContent-Disposition: form-data; name=a; name=b\r\n\r\n1\r\n--b--", "names name twice"),
    (b"--b\r\nContent-Disposition: form-data; name=\"a\r\n\r\n1\r\n--b--", "is not `type; name=value; ...`"),
    (b"--b\r\n\xff: x\r\n\r\n1\r\n--b--", "part 1: its headers are not UTF-8"),
    (b"".join(b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n\r\n" for _ in range(65)) + b"--b--",
     "more than 64 parts"),
])
def test_the_multipart_reader_refuses_what_is_malformed(body, message):
    with pytest.raises(RequestError) as e:
        multipart.parse(body, "multipart/form-data; boundary=b")
    assert e.value.status == 400 and message in e.value.messages[0]


def test_the_multipart_reader_takes_what_rfc_2046_allows():
    body = (b"preamble\r\n--b \t\r\nContent-Disposition: form-data; name=\"a \\\"q\\\"\"; filename=\"\"\r\n\r\n"
            b"x\r\n-b\r\n--b\r\ncontent-disposition: form-data; name=n\r\n\r\n\r\n--b--\r\nepilogue")
    parts = multipart.parse(body, 'multipart/form-data; boundary="b"')
    assert [(p.name, p.filename, p.data) for p in parts] == [('a "q"', "", b"x\r\n-b"), ("n", None, b"")]
    for content_type, message in [("multipart/form-data", "its boundary must be 1 to 70 ASCII characters"),
                                  (f"multipart/form-data; boundary={'b' * 71}", "its boundary must be 1 to 70"),
                                  ("text/plain; boundary=b", "Content-Type: must be multipart/form-data")]:
        with pytest.raises(RequestError, match=re.escape(message)):
            multipart.parse(body, content_type)


def test_url_flags_are_checked(capsys):
    for flags, message in [(["--url-ttl", "-1"], "argument --url-ttl: must be a number in [0, 86400], got '-1'"),
                           (["--public-url", "ftp://x"], "argument --public-url: must be http(s)://host[:port][/path], "
                                                         "got 'ftp://x'"),
                           (["--public-url", "https://x/?a=1"], "argument --public-url: must be http(s)://")]:
        assert main(flags) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# ---------------------------------------------------------------- fuzz: bad bodies, 4xx in OpenAI's envelope


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                           .filter(lambda x: abs(x) < 1e300) | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)
ONE_OF = {"response_format": ("b64_json", "url"), "output_format": ("png", "jpeg", "webp"),
          "moderation": ("auto", "low"), "background": ("auto", "opaque"), "quality": ("auto", "standard"),
          "style": ("vivid",), "stream": (False,), "partial_images": (0,)}
INTEGERS = {"n": (1, 10), "num_steps": (1, 150), "seed": (0, 2 ** 64 - 1)}


def _allowed(field, v) -> bool:
    """The rule each field states, restated as the fuzz's oracle for a value the body may carry."""
    if field in ONE_OF:
        return any(type(v) is type(x) and v == x for x in ONE_OF[field])
    if field in INTEGERS:
        return type(v) is int and INTEGERS[field][0] <= v <= INTEGERS[field][1]
    if field == "size":
        m = re.fullmatch(r"([0-9]+)x([0-9]+)", v) if isinstance(v, str) else None
        return v == "auto" or bool(m and all(256 <= int(s) <= 2048 and int(s) % 8 == 0 for s in m.groups()))
    if field == "guidance":
        return type(v) in (int, float) and 0 <= v <= 100
    return isinstance(v, str) and len(v) >= (field == "prompt")  # prompt, negative_prompt, user, model


@st.composite
def bad_generation(draw) -> bytes:
    base = {"model": LCM, "prompt": "a cat", "size": "256x256", "num_steps": 1}
    kind = draw(st.sampled_from(["field", "field", "field", "model", "unknown", "not an object", "raw"]))
    if kind == "field":
        field = draw(st.sampled_from([*ONE_OF, *INTEGERS, "size", "guidance", "prompt", "negative_prompt", "user"]))
        nullable = field not in ("prompt", "user")
        value = draw((JSON_VALUES | st.from_regex(r"-?\d{1,5}[xX*]\d{1,5}", fullmatch=True)).filter(
            lambda v: not _allowed(field, v) and not (v is None and nullable)))
        return json.dumps({**base, field: value}).encode()
    if kind == "model":  # no such model (404), or no model at all ("" is not a name: 400)
        return json.dumps({**base, "model": draw(st.text(max_size=30).filter(lambda t: t not in REGISTRY))}).encode()
    if kind == "unknown":
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in GENERATION_FIELDS),
                                     JSON_VALUES, min_size=1, max_size=3))
        return json.dumps({**base, **extra}).encode()
    if kind == "not an object":
        return json.dumps(draw(JSON_VALUES.filter(lambda v: not isinstance(v, dict)))).encode()
    raw = draw(st.binary(max_size=200))
    return raw if not raw.strip().startswith(b"{") else raw + b"\x00"  # never a valid JSON object


IMAGE = picture(64, 64)
NOT_IMAGES = [b"", b"GIF89a", IMAGE[:40], IMAGE[:len(IMAGE) // 2], b"\x89PNG\r\n\x1a\n" + b"\0" * 30, b"RIFF\0\0\0\0WEBPVP8 "]
BAD_MASKS = NOT_IMAGES + [rgba(clear_middle(32, 64)),                 # not the image's size
                          png_bytes(np.zeros((64, 64), np.uint8)),    # no alpha channel
                          rgba(np.full((64, 64, 4), 255))]            # nothing transparent: nothing to edit


@st.composite
def bad_edit(draw) -> tuple[bytes, str]:
    fields = {"model": IMG2IMG, "prompt": "a cat", "num_steps": "1"}
    files = [("image", ("a.png", IMAGE, "image/png"))]
    kind = draw(st.sampled_from(["field", "field", "image", "mask", "files", "truncated", "content type", "raw"]))
    if kind == "field":
        field = draw(st.sampled_from(["n", "size", "response_format", "output_format", "num_steps", "seed", "guidance",
                                      "strength", "stream", "quality", "input_fidelity", "nonsense"]))
        fields[field] = draw(st.text(min_size=1, max_size=12).filter(lambda t: not _allowed_text(field, t)))
    elif kind == "image":
        files = [("image", ("x.png", draw(st.sampled_from(NOT_IMAGES)), "image/png"))]
    elif kind == "mask":
        files.append(("mask", ("m.png", draw(st.sampled_from(BAD_MASKS)), "image/png")))
    elif kind == "files":  # no image, two, a file sd does not take, a field sent as a file
        files = draw(st.sampled_from([[], [("image[]", ("a.png", IMAGE)), ("image[]", ("b.png", IMAGE))],
                                      [*files, ("markup", ("m.png", IMAGE))], [*files, ("prompt", ("p.txt", b"x"))],
                                      [*files, ("n", ("n.txt", b"1"))]]))
    body, content_type = form(fields, files)
    if kind == "truncated":
        body = body[:draw(st.integers(0, len(body) - 5))]
    elif kind == "content type":
        content_type = draw(st.sampled_from(["application/json", "multipart/form-data", "multipart/form-data; "
                                             "boundary=other", "", "multipart/mixed; boundary=x"]))
    elif kind == "raw":
        body = draw(st.binary(max_size=300))
    return body, content_type


def _allowed_text(field, text) -> bool:
    """A multipart text value the field would take (its JSON reading, as the server reads it)."""
    if text == "" and field != "prompt":
        return True
    if field in ("n", "num_steps", "seed"):
        return bool(re.fullmatch(r"[0-9]+", text)) and _allowed(field, int(text))
    if field in ("guidance", "strength"):
        try:
            value = float(text)
        except ValueError:
            return False
        return 0 <= value <= (100 if field == "guidance" else 1) and bool(re.fullmatch(r"[0-9.eE+-]+", text))
    if field == "stream":
        return text == "false"
    if field == "input_fidelity":
        return text == "low"
    if field == "nonsense":
        return False
    return field == "prompt" or _allowed(field, text)


class Fuzz:
    """Posts bodies and keeps what came back: every answer must be a 4xx in OpenAI's envelope."""

    def __init__(self, url: str, headers: dict):
        self.client, self.url = httpx.Client(headers=headers, timeout=60), url
        self.statuses = collections.Counter()

    def post(self, path: str, body: bytes, content_type: str):
        r = self.client.post(self.url + path, content=body, headers={"Content-Type": content_type})
        self.statuses[r.status_code] += 1
        assert 400 <= r.status_code < 500, (r.status_code, body[:200], r.text[:300])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in r.text


FUZZ = dict(deadline=None, derandomize=True, database=None,  # the same bodies on every run
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    server = InProcessServer(fake_cache(tmp_path_factory.mktemp("fuzz")))
    yield server, Fuzz(server.url, {})
    server.stop()


def test_fuzz_generations_in_process(fuzz_target):
    server, fuzz = fuzz_target

    @settings(max_examples=300, **FUZZ)
    @given(bad_generation())
    def check(body):
        fuzz.post(GENERATIONS, body, "application/json")
    check()
    assert sum(fuzz.statuses.values()) >= 300 and server.health()["ok"]
    print("generations:", dict(fuzz.statuses))


def test_fuzz_edits_in_process(fuzz_target):
    server, fuzz = fuzz_target
    fuzz.statuses.clear()

    @settings(max_examples=300, **FUZZ)
    @given(bad_edit())
    def check(case):
        fuzz.post(EDITS, *case)
    check()
    assert sum(fuzz.statuses.values()) >= 300 and server.health()["ok"]
    print("edits:", dict(fuzz.statuses))


def test_fuzz_the_real_server(server):
    """A smaller run against the `sd serve` process itself; healthy after, and still generating."""
    fuzz = Fuzz(server.url, server.headers)

    @settings(max_examples=60, **FUZZ)
    @given(bad_generation(), bad_edit())
    def check(body, case):
        fuzz.post(GENERATIONS, body, "application/json")
        fuzz.post(EDITS, *case)
    check()
    assert sum(fuzz.statuses.values()) >= 120, fuzz.statuses
    health = httpx.get(f"{server.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["ok"] and server.proc.poll() is None
    assert "Traceback" not in server.log()
    client_for(server).images.generate(model=LCM, prompt="still fine", size="256x256", extra_body=FAST)
    print("real server:", dict(fuzz.statuses))


# ---------------------------------------------------------------- the README's snippets


def readme_section() -> str:
    text = README.read_text()
    return text[text.index("### OpenAI Images API"):][4:].split("\n### ", 1)[0]


def as_tested(block: str, server) -> str:
    """A README block for the test server: its address, and 256x256 for 512x512 (the tiny models'
    time goes with the pixels)."""
    return block.replace("http://127.0.0.1:8000", server.url).replace("512x512", "256x256")


def test_the_readme_python_snippet_runs(server, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", readme_section(), re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_API_TOKEN", TOKEN)
    exec(compile(as_tested(code, server), "README.md", "exec"), {})
    written = sorted(tmp_path.glob("lighthouse-*.png"))
    assert len(written) == 2 and all(Image.open(p).size == (256, 256) for p in written)


def test_the_readme_curl_calls_run(server, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    (tmp_path / "photo.png").write_bytes(picture(256, 256, seed=3))
    (tmp_path / "mask.png").write_bytes(rgba(clear_middle()))
    block = re.search(r"```sh\n(.*?)```", readme_section(), re.DOTALL).group(1)
    env = {**os.environ, "SD_API_TOKEN": TOKEN}
    subprocess.run(as_tested(block, server), shell=True, check=True, env=env, cwd=tmp_path, timeout=120)
    assert Image.open(tmp_path / "lighthouse.png").size == (256, 256)
    assert Image.open(tmp_path / "door.png").size == (256, 256)
