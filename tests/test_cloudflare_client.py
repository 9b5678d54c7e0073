"""The official `cloudflare` clients pointed at `sd serve` (servers from tests/server_fixtures.py):
Python (installed with the [test] extra) and, when node and npm are at hand, the npm package.

Text-to-image answers are PNG bytes, as from Cloudflare's REST API, so they are read through
`with_raw_response` (Python) / `.asResponse()` (JS): the clients' parsed `run()` expects JSON.
"""

import asyncio
import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import cloudflare
import httpx
import pytest
from PIL import Image

from sd.registry import REGISTRY
from sd.serve.workers_ai import code_of

pytest.register_assert_rewrite("server_fixtures")  # before the import below, which the plugin line then reuses
from server_fixtures import IMG2IMG, LCM, PNG_SIGNATURE, SDXL, TOKEN, picture  # noqa: E402

pytest_plugins = ["server_fixtures"]

JS_DIR = Path(__file__).parent / "js"
SMALL = dict(width=256, height=256, num_steps=2, seed=1)


def client_for(server, token=TOKEN, **kw) -> cloudflare.Cloudflare:
    return cloudflare.Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", max_retries=0, **kw)


def assert_png(data: bytes, size=(256, 256)):
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == size and image.format == "PNG"


def test_run_returns_the_png(server):
    cf = client_for(server)
    response = cf.ai.with_raw_response.run(SDXL, account_id="acc", prompt="a red circle", **SMALL)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    # the client percent-encodes the id's slashes
    assert "/ai/run/@cf%2Fstabilityai%2F" in str(response.http_request.url)
    png = response.read()
    assert_png(png)
    # the same image as the plain route gives for the same input
    direct = httpx.post(f"{server.url}/ai/run/{SDXL}", headers=server.headers, timeout=60,
                        json={"prompt": "a red circle", **SMALL})
    assert direct.content == png


def test_run_with_every_field(server):
    cf = client_for(server)
    source = picture(320, 256, seed=3)
    common = dict(account_id="acc", prompt="a cat", negative_prompt="blurry", guidance=6.5, strength=0.6,
                  num_steps=3, seed=9)
    from_array = cf.ai.with_raw_response.run(IMG2IMG, image=list(source), **common).read()
    assert_png(from_array, size=(320, 256))
    from_b64 = cf.ai.with_raw_response.run(IMG2IMG, image_b64=base64.b64encode(source).decode(), **common).read()
    assert from_b64 == from_array
    mask = list(picture(320, 256, seed=4))
    assert_png(cf.ai.with_raw_response.run(IMG2IMG, image=list(source), mask=mask, **common).read(), size=(320, 256))


def test_async_client(server):
    async def go():
        async with cloudflare.AsyncCloudflare(api_token=TOKEN, base_url=f"{server.url}/client/v4",
                                              max_retries=0) as cf:
            response = await cf.ai.with_raw_response.run(LCM, account_id="acc", prompt="a cat", **SMALL)
            return await response.read()
    assert_png(asyncio.run(go()))


def test_bad_input_raises_bad_request_with_the_envelope(server):
    cf = client_for(server)
    with pytest.raises(cloudflare.BadRequestError) as info:
        cf.ai.run(IMG2IMG, account_id="acc", prompt="a cat", width=4000, num_steps=50)
    e = info.value
    assert e.status_code == 400
    assert e.body == {"success": False, "messages": [], "result": None,
                      "errors": [{"code": code_of(400), "message": "width: must be an integer in [256, 2048], got 4000"},
                                 {"code": code_of(400), "message": "num_steps: must be an integer in [1, 20], got 50"}]}
    assert [err.code for err in e.errors] == [code_of(400)] * 2
    with pytest.raises(cloudflare.BadRequestError, match="prompt: must be a string of at least 1 character"):
        cf.ai.run(IMG2IMG, account_id="acc", prompt="")


def test_auth_and_not_found_errors(server):
    with pytest.raises(cloudflare.AuthenticationError) as info:
        client_for(server, token="wrong").ai.run(IMG2IMG, account_id="acc", prompt="a cat")
    assert info.value.body["errors"][0] == {"code": code_of(401), "message": "authorization: wrong API token"}
    with pytest.raises(cloudflare.NotFoundError) as info:
        client_for(server).ai.run("@cf/meta/llama-3-8b-instruct", account_id="acc", prompt="hi")
    assert info.value.body["errors"][0]["code"] == code_of(404)


def test_missing_weights_are_a_server_error(busy_server):
    with pytest.raises(cloudflare.InternalServerError) as info:
        client_for(busy_server).ai.run(LCM, account_id="acc", prompt="a cat")
    assert info.value.status_code == 503 and "given with --model" in info.value.body["errors"][0]["message"]


def test_models_list(server):
    models = list(client_for(server).ai.models.list(account_id="acc"))
    assert [m["name"] for m in models] == list(REGISTRY)
    assert all(m["task"]["name"] == "Text-to-Image" and m["present"] for m in models)
    assert [m["name"] for m in client_for(server).ai.models.list(account_id="acc", search="lightning")] == [
        "@cf/bytedance/stable-diffusion-xl-lightning"]


# ---------------------------------------------------------------- the npm package


def js_client() -> Path:
    """tests/js with the npm `cloudflare` package installed (once, from tests/js/package.json), or skip."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node / npm not installed")
    if not (JS_DIR / "node_modules" / "cloudflare" / "package.json").is_file():
        try:
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(JS_DIR)],
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install timed out")
        if done.returncode != 0 or not (JS_DIR / "node_modules" / "cloudflare").is_dir():
            pytest.skip(f"npm install cloudflare failed: {done.stderr[-500:]}")
    return Path(node)


def test_npm_cloudflare_client(server):
    node = js_client()
    done = subprocess.run([str(node), str(JS_DIR / "run.mjs"), f"{server.url}/client/v4", TOKEN, IMG2IMG],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["png"]["status"] == 200 and report["png"]["contentType"] == "image/png"
    png = base64.b64decode(report["png"]["base64"])
    assert_png(png)
    direct = httpx.post(f"{server.url}/ai/run/{IMG2IMG}", headers=server.headers, timeout=60,
                        json={"prompt": "a red circle", **SMALL})
    assert direct.content == png  # same seed, same bytes, whichever client
    bad = report["badRequest"]
    assert bad["status"] == 400 and bad["name"] == "BadRequestError"
    assert bad["errors"] == [{"code": code_of(400), "message": "width: must be an integer in [256, 2048], got 4000"}]
    assert report["authentication"] == {"status": 401, "name": "AuthenticationError"}
    assert report["models"] == list(REGISTRY)
