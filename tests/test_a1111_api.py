"""The AUTOMATIC1111 API dialect (sd/serve/a1111.py): the `webuiapi` client and the request bodies
Open WebUI and SillyTavern send, against a real `sd serve` process (tests/server_fixtures.py); the
name table; progress and interrupt on an in-process server whose real tiny pipeline waits after its
first step until the test lets it go; errors and a fuzz run, each answered in A1111's envelope."""

import base64
import io
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from sd.serve import a1111, a1111_names as names
from sd.serve.cli import parser

pytest.register_assert_rewrite("server_fixtures")  # before the import below, which the plugin line then reuses
from server_fixtures import (IMG2IMG, INPAINT, LCM, SDXL, TOKEN, InProcessServer, broken_bodies, decode,  # noqa: E402
                             fake_cache, picture, png_bytes, random_json, wait_until, write_sd15)

pytest_plugins = ["server_fixtures"]

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 3}


def basic(password: str = TOKEN, user: str = "sd") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def assert_envelope(response, status, *fragments) -> str:
    """A1111's error envelope (its api_middleware): error, detail, body, errors; no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}, body
    assert isinstance(body["detail"], str) and body["detail"] and body["errors"].startswith(f"{status}: ")
    assert "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in body["detail"], (fragment, body["detail"])
    return body["detail"]


def pictures(reply: dict) -> list[np.ndarray]:
    return [decode(base64.b64decode(image)) for image in reply["images"]]


@pytest.fixture(scope="module")
def api(server) -> webuiapi.WebUIApi:
    """The webuiapi client as its README sets it up, with the API token as the Basic password."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="sd", password=TOKEN,
                             sampler="DPM++ 2M", steps=2)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=basic(), timeout=60) as c:
        yield c


# ---------------------------------------------------------------- webuiapi against `sd serve`


def test_webuiapi_txt2img_batch_has_a1111s_seeds_and_each_image_is_its_seed_alone(api, client):
    result = api.txt2img(prompt="a (red:1.3) circle, [blue] background", seed=7, batch_size=2, width=64, height=64)
    assert [image.size for image in result.images] == [(64, 64)] * 2
    info = result.info
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and info["sampler_name"] == "DPM++ 2M"
    assert info["extra_generation_params"] == {"Schedule type": "Karras"}  # DPM++ 2M's Automatic schedule
    assert len(info["infotexts"]) == 2 and "Seed: 8" in info["infotexts"][1]
    assert result.parameters["prompt"].startswith("a (red:1.3)") and result.parameters["enable_hr"] is False
    settings = json.loads(result.images[1].info["sd"])  # what sd ran: A1111's names mapped onto sd's
    assert (settings["sampler"], settings["schedule"], settings["prompt_style"]) == ("dpmpp_2m", "karras", "weighted")
    alone = client.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.3) circle, [blue] background", "seed": 8,
                                                   "width": 64, "height": 64, "steps": 2, "sampler_name": "DPM++ 2M"})
    batch = [np.asarray(image.convert("RGB"), int) for image in result.images]
    alone = pictures(alone.json())[0].astype(int)
    # One batch of 2 runs other float32 kernels than a batch of 1, and this random-weight test model
    # amplifies their rounding (measured: at most 4 levels, 0.6 on average); seed 7's picture is ~40
    # levels away on average, so the batch's second picture is seed 8's.
    assert np.abs(alone - batch[1]).mean() <= 1 and np.abs(alone - batch[1]).max() <= 8
    assert np.abs(alone - batch[0]).mean() > 10


def test_webuiapi_img2img_and_inpainting(api):
    init = Image.open(io.BytesIO(picture(64, 64, seed=4)))
    result = api.img2img(images=[init], prompt="a cat", denoising_strength=0.5, width=64, height=64, seed=1)
    assert len(result.images) == 1 and result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # as A1111, unless include_init_images
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # white repaints
    for invert in (0, 1):
        done = api.img2img(images=[init], mask_image=mask, prompt="a cat", inpaint_full_res=False,
                           inpainting_fill=1, inpainting_mask_invert=invert, mask_blur=0, width=64, height=64,
                           override_settings={"sd_model_checkpoint": INPAINT})
        out, before = np.asarray(done.images[0].convert("RGB")), np.asarray(init.convert("RGB"))
        kept = np.ones((64, 64), bool)
        kept[16:48, 16:48] = False
        kept = ~kept if invert else kept
        assert np.array_equal(out[kept], before[kept])  # A1111 pastes the original back outside the mask
        assert not np.array_equal(out[~kept], before[~kept])
        assert done.info["is_using_inpainting_conditioning"] is True


def test_webuiapi_lists_options_and_model_switch(api, server):
    assert api.util_get_sampler_names() == sorted(s.label for s in names.SAMPLERS)
    assert api.util_get_scheduler_names() == sorted(s.name for s in names.SCHEDULES)
    assert set(api.util_get_model_names()) >= {IMG2IMG, LCM, SDXL}
    assert api.util_get_current_model() == IMG2IMG
    try:
        api.util_set_model(LCM)
        assert api.get_options()["sd_model_checkpoint"] == LCM
        assert api.txt2img(prompt="x", width=64, height=64).info["sd_model_name"] == LCM.rsplit("/", 1)[-1]
        api.set_options({"CLIP_stop_at_last_layers": 2})
        result = api.txt2img(prompt="x", width=64, height=64)
        assert result.info["clip_skip"] == 2 and json.loads(result.images[0].info["sd"])["clip_skip"] == 1
    finally:
        api.set_options({"sd_model_checkpoint": IMG2IMG, "CLIP_stop_at_last_layers": 1})
    assert api.get_progress()["progress"] == 0 and api.interrupt() == {}


# ---------------------------------------------------------------- other clients' bodies


def test_open_webui_bodies(server):
    """Open WebUI's A1111 engine (open-webui/open-webui, backend/open_webui/routers/images.py): it reads
    GET /sdapi/v1/options for the current model, switches by POSTing the whole options dict back with
    sd_model_checkpoint changed (set_image_model), lists /sdapi/v1/sd-models as {id: title, name:
    model_name}, sends `Authorization: Basic base64(AUTOMATIC1111_API_AUTH)` and generates with
    {prompt, batch_size, width, height, steps, negative_prompt} plus its AUTOMATIC1111_PARAMS setting."""
    headers = {"authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        titles = [m["title"] for m in c.get("/sdapi/v1/sd-models").json()]
        options = c.get("/sdapi/v1/options").json()
        options["sd_model_checkpoint"] = next(t for t in titles if t != options["sd_model_checkpoint"])
        try:
            assert c.post("/sdapi/v1/options", json=options).status_code == 200
            assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == options["sd_model_checkpoint"]
        finally:
            c.post("/sdapi/v1/options", json={"sd_model_checkpoint": IMG2IMG})
        body = {"prompt": "a lighthouse at dusk", "batch_size": 2, "width": 64, "height": 64, "steps": 2,
                "negative_prompt": "blurry", **{"cfg_scale": 7, "sampler_name": "Euler a"}}
        reply = c.post("/sdapi/v1/txt2img", json=body)
        assert reply.status_code == 200, reply.text
        assert len(pictures(reply.json())) == 2


def test_sillytavern_body(client):
    """SillyTavern's stable-diffusion extension (SillyTavern/SillyTavern,
    public/scripts/extensions/stable-diffusion/index.js, generateAutoImage): its server forwards this
    body to /sdapi/v1/txt2img, fields for SD.Next (`clip_skip`) and Forge (`hr_additional_modules`)
    included, which A1111 ignores and so do we."""
    body = {"prompt": "portrait of a knight", "negative_prompt": "lowres", "sampler_name": "DPM++ 2M",
            "scheduler": "Karras", "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False,
            "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "hr_additional_modules": [],
            "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": 42,
            "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "None"},
            "override_settings_restore_afterwards": True,
            "clip_skip": 2, "save_images": True, "send_images": True, "do_not_save_grid": False,
            "do_not_save_samples": False}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    assert info["seed"] == 42 and info["clip_skip"] == 2 and len(reply.json()["images"]) == 1
    assert client.post("/sdapi/v1/txt2img", json={**body, "send_images": False}).json()["images"] == []


# ---------------------------------------------------------------- names, prompts, masks (no server)


def test_sampler_names_both_forms_and_the_automatic_schedule():
    separate, fused = names.choose("DPM++ 2M", "Karras"), names.choose("DPM++ 2M Karras", None)
    assert separate == fused == names.choose("DPM++ 2M", "automatic")  # Karras is DPM++ 2M's own
    assert (fused.sampler, fused.schedule) == ("dpmpp_2m", "karras")
    assert names.choose("Euler a", None).schedule is None        # no schedule of its own: the model's
    assert names.choose("k_euler", "SGMUniform").schedule == "sgm_uniform"
    assert names.choose("DPM++ 2M SDE Heun", None).options == {"solver_type": "heun"}
    assert names.choose(None, "Exponential") == names.Choice(None, "Exponential", None, "exponential", {})
    with pytest.raises(ValueError, match="sampler_name: 'DPM fast' is an A1111 sampler sd does not implement"):
        names.choose("DPM fast", None)
    with pytest.raises(ValueError, match=r"sampler_name: 'Eulr' is not one of DPM\+\+ 2M, "):
        names.choose("Eulr", None)
    with pytest.raises(ValueError, match="scheduler: 'Normal' is an A1111 scheduler sd does not implement"):
        names.choose("Euler", "Normal")
    with pytest.raises(ValueError, match="contradicts the Karras schedule"):
        names.choose("DPM++ 2M Karras", "Exponential")
    from sd.samplers import SAMPLERS
    from sd.schedule import SCHEDULES
    assert all(s.sampler in SAMPLERS for s in names.SAMPLERS)
    assert all(s.schedule in SCHEDULES for s in names.SCHEDULES if s.schedule)


@pytest.mark.parametrize("prompt, fragment", [
    ("a <lora:style:0.8> cat", "extra networks (<lora:style:0.8>)"), ("a cat AND a dog", "AND (composable"),
    ("a [cat|dog]", "alternation [cat|dog]"), ("a [cat:dog:0.5]", "prompt editing [cat:dog:0.5]"),
    ("a [[cat]:dog:10]", "prompt editing [cat:dog:10]"), ("[(cat:1.2):dog:0.3]", "prompt editing")])
def test_a1111_prompt_syntax_sd_lacks_is_refused(prompt, fragment):
    assert any(fragment in p for p in a1111.prompt_problems("prompt", prompt))


def test_emphasis_and_break_are_read_not_refused():
    for prompt in ("a (cat:1.2), [dog], ((bird)) BREAK sky", r"\[not a bracket\] and (x:0.5)", "a [cat] android"):
        assert a1111.prompt_problems("prompt", prompt) == []


def test_masks_read_as_a1111_reads_them():
    image = png_bytes(np.zeros((32, 32, 3), np.uint8))
    grey = np.zeros((32, 32), np.uint8)
    grey[8:24, 8:24] = 255
    alpha = np.zeros((32, 32, 4), np.uint8)
    alpha[8:24, 8:24, 3] = 255  # opaque repaints, as A1111's alpha masks
    for mask in (png_bytes(grey), png_bytes(alpha)):
        for invert in (False, True):
            _, prepared = a1111.prepared(image, mask, invert, (0, 0), fill=False)
            assert np.array_equal(decode(prepared)[..., 0] > 127, (grey > 127) != invert)
    _, blurred = a1111.prepared(image, png_bytes(grey), False, (4, 4), fill=False)
    edge = decode(blurred)[16, 4:12, 0]
    assert 0 < edge.min() < 128 < edge.max() < 255 and np.all(np.diff(edge.astype(int)) >= 0)


def test_fill_paints_the_hole_with_the_colours_around_it():
    array = np.zeros((64, 64, 3), np.uint8)
    array[:, :32] = (200, 30, 30)
    array[:, 32:] = (30, 30, 200)
    array[20:44, 4:28] = (0, 255, 0)  # what is to be repainted, inside the red half
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 4:28] = 255
    filled, _ = a1111.prepared(png_bytes(array), png_bytes(mask), False, (0, 0), fill=True)
    hole = decode(filled)[28:36, 12:20].astype(int)
    assert hole[..., 1].max() < 60 and hole[..., 0].min() > 120  # red around it, the green gone
    assert np.array_equal(decode(filled)[mask == 0], array[mask == 0])


def test_the_readme_names_what_the_table_serves_and_refuses():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### AUTOMATIC1111 API", 1)[1].split("\n## ", 1)[0]
    for name in ([s.label for s in names.SAMPLERS] + [s.label for s in names.SCHEDULES] + list(names.SAMPLERS_NOT_IN_SD)
                 + list(names.SCHEDULES_NOT_IN_SD) + [s.sampler for s in names.SAMPLERS if s.label.lower() != s.sampler]):
        assert name in section, name


def test_prompt_style_flag():
    assert parser().parse_args(["--prompt-style", "weighted"]).prompt_style == "weighted"
    assert parser().parse_args([]).prompt_style is None
    with pytest.raises(SystemExit):
        parser().parse_args(["--prompt-style", "compel"])


# ---------------------------------------------------------------- errors, limits, fuzz


def bad_bodies(mode: str):
    """(what, body, status) for a txt2img or img2img route: wrong types and ranges per field, what
    sd refuses set to non-defaults, bad names and prompts, bad pictures, broken JSON, random bytes,
    random JSON with one bad field."""
    fields = a1111.TXT2IMG if mode == "txt2img" else a1111.IMG2IMG
    base = {"prompt": "x", **SMALL}
    if mode == "img2img":
        base["init_images"] = [base64.b64encode(picture(64, 64)).decode()]
    wrong = {"str": [1, True, [], {}], "int": ["1", 1.5, True, [], {}], "number": ["1", True, [], None],
             "bool": [1, "true", None, []], "list": ["x", 1, {}], "dict": ["x", 1, []]}
    for name, (kind, default) in fields.items():
        for value in wrong[kind]:
            if value is None and default is None:
                continue
            yield f"{name}={value!r}", {**base, name: value}, 400
    for name, (lo, hi) in a1111.RANGES.items():
        if name in fields:
            yield f"{name} below", {**base, name: lo - 1}, 400
            yield f"{name} above", {**base, name: hi + (1 if isinstance(hi, int) else 0.5)}, 400
    refused = {"enable_hr": True, "restore_faces": True, "tiling": True, "styles": ["x"], "subseed_strength": 0.5,
               "seed_resize_from_h": 64, "script_name": "x", "alwayson_scripts": {"ControlNet": {"args": []}},
               "refiner_checkpoint": "x", "s_min_uncond": 0.5, "infotext": "x", "firstphase_width": 64,
               "resize_mode": 1, "inpainting_fill": 2, "mask_round": False, "initial_noise_multiplier": 0.5,
               "latent_mask": "x", "firstpass_image": "x"}
    for name, value in refused.items():
        if name in fields:
            yield f"refused {name}", {**base, name: value}, 400
    for body in ({"sampler_name": "DPM fast"}, {"sampler_name": "x"}, {"scheduler": "Uniform"},
                 {"sampler_name": "Euler Karras", "scheduler": "Beta"}, {"prompt": "<lora:x:1>"},
                 {"prompt": "[a|b]"}, {"negative_prompt": "a AND b"}, {"steps ": 2}, {"Prompt": "x"},
                 {"batch_size": 16, "n_iter": 2}, {"override_settings": {"sd_model_checkpoint": "nope"}},
                 {"override_settings": {"sd_vae": "other.vae"}}, {"override_settings": {"x": 1}},
                 {"sampler_name": "DDIM", "eta": 0.5}, {"prompt": "\ud800"}, {"seed": 2 ** 64 - 1, "batch_size": 2}):
        yield f"body {body}", {**base, **body}, 400
    if mode == "img2img":
        png = picture(64, 64)
        for images in ([], ["x"], ["data:image/png,abc"], ["http://example.com/a.png"], ["@@@@"],
                       [base64.b64encode(b"hello").decode()], [base64.b64encode(png[:60]).decode()], [1],
                       [base64.b64encode(png).decode()] * 2):
            yield f"init_images={str(images)[:30]}", {**base, "init_images": images}, 400
        yield "no init_images", {k: v for k, v in base.items() if k != "init_images"}, 400
        yield "only masked", {**base, "mask": base64.b64encode(png).decode()}, 400
        yield "bad mask", {**base, "mask": "!!", "inpaint_full_res": False}, 400
    for i, body in enumerate(broken_bodies()):
        yield f"raw #{i}", body, 400
    rng = np.random.default_rng(1)
    for i in range(30):
        yield f"random bytes #{i}", rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes(), 400
    keys = list(fields)[:12] + ["zzz"]
    for i in range(30):  # valid JSON, random structure; a wrong `steps` keeps any of it from being valid
        value = random_json(rng, 4, keys)
        yield f"random JSON #{i}", {**value, "steps": "many"} if isinstance(value, dict) else value, 400


def test_fuzz_in_process_hundreds_of_bad_bodies_get_a1111_envelopes(tmp_path):
    server = InProcessServer(fake_cache(tmp_path))
    try:
        cases = [(what, body, status, mode) for mode in ("txt2img", "img2img")
                 for what, body, status in bad_bodies(mode)]
        assert len(cases) >= 500
        failures = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for what, body, status, mode in cases:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = c.post(f"/sdapi/v1/{mode}", content=content, headers={"Content-Type": "application/json"})
                try:
                    assert_envelope(r, status)
                except AssertionError as e:
                    failures.append(f"{mode} {what}: {e}")
            assert not failures, "\n".join(failures[:20])
            assert c.post("/sdapi/v1/txt2img", json={"prompt": "still fine", **SMALL}).status_code == 200
        assert server.health()["ok"] is True
    finally:
        server.stop()


def test_errors_on_the_real_server(server, client):
    """A sample of the fuzz cases, the limits and authentication, against the real process."""
    sample = [case for k, case in enumerate(bad_bodies("txt2img")) if k % 9 == 0]
    failures = []
    for what, body, status in sample:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post("/sdapi/v1/txt2img", content=content, headers={"Content-Type": "application/json"})
        try:
            assert_envelope(r, status)
        except AssertionError as e:
            failures.append(f"{what}: {e}")
    assert not failures, "\n".join(failures[:20])
    assert_envelope(client.post("/sdapi/v1/txt2img", json={"prompt": "x" * (4 * 2 ** 20)}), 413)
    assert_envelope(client.post("/sdapi/v1/txt2img", json={"enable_hr": True, "step": 2}), 400,
                    "enable_hr: hires fix is not served", "step: not a field of txt2img (did you mean steps?)")
    assert_envelope(client.post("/sdapi/v1/txt2img", json={"sampler_name": "Restart"}), 400,
                    "'Restart' is an A1111 sampler sd does not implement (sd has: DPM++ 2M,")
    assert_envelope(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5.ckpt [abc]"}), 400,
                    "sd_model_checkpoint: \"v1-5.ckpt [abc]\" is not one of the served models")
    assert_envelope(client.get("/sdapi/v1/progress", params={"skip_current_image": "maybe"}), 400)
    assert_envelope(client.get("/sdapi/v1/extensions"), 404, "no route for GET /sdapi/v1/extensions")
    assert_envelope(client.get("/sdapi/v1/txt2img"), 405)
    for headers in ({}, basic("wrong"), basic(TOKEN[:-1]), {"Authorization": "Basic !!"}):
        with httpx.Client(base_url=server.url, headers=headers) as anonymous:
            for r in (anonymous.post("/sdapi/v1/txt2img", json=SMALL), anonymous.get("/sdapi/v1/options")):
                assert_envelope(r, 401, "authorization:")
                assert r.headers["www-authenticate"] == "Basic"
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}) as bearer:
        assert bearer.get("/sdapi/v1/sd-models").status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "logged", **SMALL})
    line = wait_until(lambda: next((x for x in server.log().splitlines()
                                    if f"id={r.headers['x-request-id']}" in x), None), "logged")
    assert f"POST /sdapi/v1/txt2img id={r.headers['x-request-id']} model={IMG2IMG} size=64x64 steps=2 status=200" \
        in line
    assert server.proc.poll() is None and client.get("/healthz").json()["ok"] is True


# ---------------------------------------------------------------- progress and interrupt


class Held:
    """A real pipeline whose run waits after its first step until the test sets `release` (passing
    checkpoints meanwhile, so a stop still lands); `waiting` is set while it waits."""

    def __init__(self, pipe):
        self.pipe, self.release, self.waiting = pipe, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, *args, callback=None, **kwargs):
        from sd.interrupt import checkpoint

        def held(step):
            if callback is not None:
                callback(step)
            if step.i == 0:
                self.waiting.set()
                while not self.release.wait(0.005):
                    checkpoint()
                self.waiting.clear()
        return self.pipe.generate(*args, callback=held, **kwargs)


@pytest.fixture
def held_server(tmp_path):
    """An in-process server whose img2img model is a real tiny SD 1.5 file, held after each run's first step."""
    from sd.registry import Registry
    from sd.serve.cache import ModelCache

    class HeldCache(ModelCache):
        def _load(self, spec):
            self.held = Held(super()._load(spec))
            return self.held

    source = write_sd15(tmp_path / "tiny.safetensors")
    server = InProcessServer(HeldCache(Registry(tmp_path, {IMG2IMG: source}), device="cpu"))
    try:
        yield server
    finally:
        server.service.cache.held.release.set() if hasattr(server.service.cache, "held") else None
        server.stop()


def run_in_thread(url: str, path: str, body: dict) -> dict:
    out = {}

    def post():
        with httpx.Client(base_url=url, timeout=120) as c:
            out["reply"] = c.post(path, json=body)
    out["thread"] = threading.Thread(target=post)
    out["thread"].start()
    return out


def test_progress_and_interrupt(held_server):
    url = held_server.url
    cache = held_server.service.cache
    idle = httpx.get(url + "/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    call = run_in_thread(url, "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 4, "width": 128,
                                                     "height": 64, "batch_size": 2, "seed": 11})
    wait_until(lambda: hasattr(cache, "held") and cache.held.waiting.is_set(), "held after its first step")
    progress = httpx.get(url + "/sdapi/v1/progress").json()
    assert progress["progress"] == pytest.approx(0.01 + 1 / 4) and progress["eta_relative"] >= 0
    assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_step"] == 1
    assert progress["state"]["sampling_steps"] == 4 and progress["state"]["interrupted"] is False
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (2 * 128 // 8, 64 // 8)  # the batch side by side, a pixel per latent pixel
    assert httpx.get(url + "/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert httpx.post(url + "/sdapi/v1/interrupt").json() == {}
    call["thread"].join(120)
    reply = call["reply"]
    assert reply.status_code == 200, reply.text  # A1111's answer: the pictures so far, from the last x0
    info = json.loads(reply.json()["info"])
    assert info["interrupted"] is True and info["all_seeds"] == [11, 12]
    assert [p.shape for p in pictures(reply.json())] == [(64, 128, 3)] * 2
    wait_until(lambda: httpx.get(url + "/sdapi/v1/progress").json()["progress"] == 0, "idle again")


def test_interrupt_leaves_other_dialects_jobs_alone(held_server):
    url, cache = held_server.url, held_server.service.cache
    call = run_in_thread(url, f"/ai/run/{IMG2IMG}", {"prompt": "a cat", "width": 256, "height": 256,
                                                       "num_steps": 2})
    wait_until(lambda: hasattr(cache, "held") and cache.held.waiting.is_set(), "held after its first step")
    assert httpx.get(url + "/sdapi/v1/progress").json()["state"]["job"] == "generation"
    assert httpx.post(url + "/sdapi/v1/interrupt").json() == {}
    cache.held.release.set()
    call["thread"].join(120)
    assert call["reply"].status_code == 200 and call["reply"].headers["content-type"] == "image/png"


def test_server_prompt_style_reaches_other_dialects_and_a1111_is_always_weighted(tmp_path):
    cache = fake_cache(tmp_path)
    server = InProcessServer(cache)
    try:
        server.service.prompt_style = "plain"
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post(f"/ai/run/{IMG2IMG}", json={"prompt": "a (cat:1.2)"}).status_code == 200
            assert c.post("/sdapi/v1/txt2img", json={"prompt": "a (cat:1.2)", **SMALL}).status_code == 200
        assert [call["prompt_style"] for call in cache.fakes[IMG2IMG].calls] == ["plain", "weighted"]
    finally:
        server.stop()


def test_queue_full_and_timeout_answer_in_a1111s_envelope(tmp_path):
    cache = fake_cache(tmp_path, release=False)
    server = InProcessServer(cache, queue_size=0)
    try:
        first = run_in_thread(server.url, "/sdapi/v1/txt2img", {"prompt": "held", **SMALL})
        wait_until(lambda: IMG2IMG in cache.fakes and cache.fakes[IMG2IMG].started.is_set(), "running")
        assert_envelope(httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}), 429,
                        "the queue is full")
        cache.fakes[IMG2IMG].release.set()
        first["thread"].join(60)
        assert first["reply"].status_code == 200
    finally:
        server.stop()
    server = InProcessServer(fake_cache(tmp_path, release=False), timeout=0.2)
    try:
        assert_envelope(httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}, timeout=60),
                        504, "timed out after 0.2 s")
    finally:
        server.stop()
