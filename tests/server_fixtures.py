"""Real `sd serve` processes on loopback ports, serving tiny random-weight models, for
tests/test_server.py and tests/test_cloudflare_client.py (loaded by both as a pytest plugin, so the
servers start once per test session).

The models are single files in the official layout, written from sd's own modules with random
weights: SD 1.5-shaped (4-channel UNet), SD 1.5 inpainting-shaped (9-channel UNet) and SDXL-shaped
(two text encoders, `label_emb`). They are small enough to make a 256x256 image in about 0.1 s on a
CPU: the VAE has four levels (latents 32x32 at 256x256) and 32 channels; attention only at the
UNet's lowest level.
"""

import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd.weights import hf_to_openclip
from sd.clip import CLIPConfig, CLIPTextModel
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"
SDXL = "@cf/stabilityai/stable-diffusion-xl-base-1.0"
LIGHTNING = "@cf/bytedance/stable-diffusion-xl-lightning"
LCM = "@cf/lykon/dreamshaper-8-lcm"
IMG2IMG = "@cf/runwayml/stable-diffusion-v1-5-img2img"
INPAINT = "@cf/runwayml/stable-diffusion-v1-5-inpainting"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

VAE = VAEConfig(channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1)
TEXT = CLIPConfig(width=64, layers=2, heads=1, mlp_width=37)


def _unet(**kw) -> UNet:
    return UNet(UNetConfig(model_channels=32, channel_mult=(1, 1, 1), num_res_blocks=1, transformer_depth=(0, 0, 1),
                           heads=(8, 8, 8), context_dim=64, **kw))


def _state(parts: dict) -> dict:
    return {prefix + k: v.contiguous() for prefix, m in parts.items() for k, v in m.state_dict().items()}


def write_sd15(path: Path, in_channels: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_file(_state({"model.diffusion_model.": _unet(in_channels=in_channels),
                      "first_stage_model.": AutoencoderKL(VAE),
                      "cond_stage_model.transformer.text_model.": CLIPTextModel(TEXT)}), str(path))
    return path


def write_sdxl(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    width = TEXT.width
    big_g = CLIPTextModel(CLIPConfig(width=width, layers=2, heads=1, mlp_width=37, act="gelu", projection_dim=width))
    state = _state({"model.diffusion_model.": UNet(UNetConfig(
                        model_channels=64, channel_mult=(1, 1, 1), num_res_blocks=1, transformer_depth=(0, 0, 1),
                        heads=(1, 1, 1), context_dim=2 * width, linear_proj=True, adm_in_channels=width + 6 * 8)),
                    "first_stage_model.": AutoencoderKL(replace_scaling(VAE, 0.13025)),
                    "conditioner.embedders.0.transformer.text_model.": CLIPTextModel(TEXT)})
    state.update({"conditioner.embedders.1.model." + k: v for k, v in hf_to_openclip(big_g.state_dict()).items()})
    save_file(state, str(path))
    return path


def replace_scaling(cfg: VAEConfig, factor: float) -> VAEConfig:
    from dataclasses import replace
    return replace(cfg, scaling_factor=factor)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def picture(width=256, height=256, seed=0) -> bytes:
    """A random RGB PNG."""
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def mask_png(width=256, height=256) -> bytes:
    """White (repaint) in the middle, black (keep) around it."""
    array = np.zeros((height, width), dtype=np.uint8)
    array[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    return png_bytes(array)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m sd.serve ARGS` on a free loopback port, its stderr in a file."""

    def __init__(self, args: list[str], log_path: Path, token: str | None = None):
        self.port, self.token, self.log_path = free_port(), token, log_path
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        env.pop("SD_API_TOKEN", None)
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "sd.serve", "--port", str(self.port), "--device", "cpu",
                                      *args], cwd=REPO, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:  # 503: serving, but a model can't load (the busy server's missing one)
                if httpx.get(self.url + "/healthz", timeout=1).status_code in (200, 503):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {seconds} s:\n{self.log()}")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def stop(self, seconds: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(seconds)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("server-models")
    corrupt = folder / "corrupt.safetensors"
    corrupt.write_bytes(b"this is not a safetensors file, just text" * 10)
    no_index = folder / "not-a-diffusers-folder"
    no_index.mkdir()
    return {"sd15": write_sd15(folder / "tiny-sd15.safetensors"),
            "inpaint": write_sd15(folder / "tiny-sd15-inpainting.safetensors", in_channels=9, seed=1),
            "sdxl": write_sdxl(folder / "tiny-sdxl.safetensors", seed=2),
            "corrupt": corrupt, "no_index": no_index, "missing": folder / "no-such-file.safetensors"}


def _servers(tiny_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")
    empty = tmp_path_factory.mktemp("empty-weights")
    m = tiny_models
    main = ServerProcess(["--weights-dir", str(empty), "--api-token", TOKEN, "--max-body-mb", "4",
                          "--model", f"{IMG2IMG}={m['sd15']}", "--model", f"{LCM}={m['sd15']}",
                          "--model", f"{INPAINT}={m['inpaint']}", "--model", f"{SDXL}={m['sdxl']}",
                          "--model", f"{LIGHTNING}={m['sdxl']}"], logs / "main.log", token=TOKEN)
    # No token; one request at a time plus one waiting; a --model source that isn't there (yet).
    busy = ServerProcess(["--weights-dir", str(empty), "--queue-size", "1",
                          "--model", f"{IMG2IMG}={m['sd15']}", "--model", f"{LCM}={m['missing']}"],
                         logs / "busy.log")
    return main, busy


@pytest.fixture(scope="session")
def servers(tiny_models, tmp_path_factory):
    started = _servers(tiny_models, tmp_path_factory)
    try:
        for server in started:  # started together, waited for in turn
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def server(servers) -> ServerProcess:
    """Every model on tiny weights; an API token; a 4 MiB body limit; the default queue (32)."""
    return servers[0]


@pytest.fixture(scope="session")
def busy_server(servers) -> ServerProcess:
    """No token; --queue-size 1; the img2img model only; the lcm id points at a missing file, the
    others at an empty weights dir."""
    return servers[1]


# ---------------------------------------------------------------- in-process servers


class LogWatch(logging.Handler):
    """The `sd.serve` log lines, with a wait for one that contains a text."""

    def __init__(self):
        super().__init__()
        self.lines, self.changed = [], threading.Condition()
        logging.getLogger("sd.serve").addHandler(self)
        logging.getLogger("sd.serve").setLevel(logging.INFO)

    def emit(self, record):
        with self.changed:
            self.lines.append(self.format(record))
            self.changed.notify_all()

    def wait_for(self, text: str, seconds: float = 60) -> str:
        """The first line containing `text`, once written (`seconds` only guards against a hang)."""
        with self.changed:
            found = self.changed.wait_for(lambda: next((line for line in self.lines if text in line), None), seconds)
        assert found, f"no log line with {text!r} after {seconds} s:\n" + "\n".join(self.lines[-20:])
        return found

    def detach(self):  # not close(): logging.config (uvicorn's) closes every handler it finds
        logging.getLogger("sd.serve").removeHandler(self)


def docs_curl(url: str, model: str, out: Path, timeout: float):
    """Cloudflare's docs example for the Workers AI text-to-image API, with only the host (`url`)
    and the model changed, run by the real curl; the answer's body is written to `out`. curl -d
    sends the form content type; the body is JSON all the same."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    command = (f'curl -s {url}/client/v4/accounts/$CLOUDFLARE_ACCOUNT_ID/ai/run/{model} -X POST '
               f'-H "Authorization: Bearer $CLOUDFLARE_API_TOKEN" -d \'{{ "prompt": "cyberpunk cat" }}\' > {out}')
    env = {**os.environ, "CLOUDFLARE_ACCOUNT_ID": "0123abcd", "CLOUDFLARE_API_TOKEN": TOKEN}
    subprocess.run(command, shell=True, check=True, env=env, timeout=timeout)


def wait_until(condition, what: str, seconds: float = 60):
    """Poll a state until it holds; `seconds` only guards against a hang, it is no expectation of speed."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"still not {what} after {seconds} s"
        time.sleep(0.01)
    return value


class InProcessServer:
    """The app under uvicorn, inside the connection guard as `sd serve` runs it, in a thread of
    the test process, around a given cache: for tests that control the worker's pipelines, the
    limits and the clock, or read the log as it is written."""

    def __init__(self, cache, *, timeout=None, queue_size=32, read_timeout=30.0, max_connections=128,
                 api_token=None, measure=lambda pipe: 0.0):
        import uvicorn

        from sd.serve.app import Service, create_app
        from sd.serve.cli import uvicorn_config
        from sd.serve.connections import ConnectionGuard
        from sd.serve.speed import Speeds
        from sd.serve.worker import Worker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        speeds = Speeds(timeout, "cpu")
        guard = ConnectionGuard(read_timeout, max_connections)
        self.service = Service(cache, Worker(cache, speeds, queue_size, measure), speeds, api_token=api_token,
                               read_timeout=read_timeout, guard=guard)
        config = uvicorn_config(create_app(self.service), guard, "127.0.0.1", self.port)
        config.log_level = "warning"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "started")
        assert self.server.started, "the in-process server did not start"

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=30).json()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


class FakePipeline:
    """What the worker needs of a Pipeline. `generate` works like a UNet that cannot finish on its
    own: it passes checkpoints (sd/interrupt.py) until the test sets `release`, so a test decides
    when a job ends, and sees when one is stopped (`stopped`)."""

    def __init__(self, defaults):
        self.defaults = defaults
        self.started, self.stopped, self.release = threading.Event(), threading.Event(), threading.Event()
        self.prompts: list[str] = []
        self.calls: list[dict] = []          # the keyword arguments of each call, but the callback
        self.fail: Exception | None = None   # raised by the next call, as from deep inside a real one

    def generate(self, prompt, *, callback=None, seed=None, width=None, height=None, **settings):
        from sd.interrupt import Interrupted, checkpoint
        self.prompts.append(prompt)
        self.calls.append({k: v for k, v in dict(seed=seed, width=width, height=height, **settings).items()
                           if v is not None})
        self.started.set()
        if self.fail is not None:
            raise self.fail
        try:
            while not self.release.wait(0.005):  # one "UNet block" per pass
                checkpoint()
        except Interrupted:
            self.stopped.set()
            raise
        image = Image.new("RGB", (8, 8), "red")
        image.info["sd"] = dict(prompt=prompt, negative_prompt=None, width=width or self.defaults.width,
                                height=height or self.defaults.height, num_steps=self.defaults.num_steps,
                                guidance=self.defaults.guidance, seed=12345 if seed is None else seed,
                                sampler="euler", schedule="default")
        return image


def fake_cache(folder: Path, release: bool = True):
    """A ModelCache whose every model is a FakePipeline (one per model), behind sources that pass
    the startup checks (a safetensors file holding one UNet tensor)."""
    from sd.registry import REGISTRY, Registry
    from sd.serve.cache import ModelCache
    stub = folder / "stub.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(stub))

    class FakeCache(ModelCache):
        def __init__(self):
            super().__init__(Registry(folder, {m: stub for m in REGISTRY}), device="cpu", max_bytes=2 ** 40)
            self.fakes = {}

        def _load(self, spec):
            pipe = self.fakes[spec.id] = FakePipeline(self.defaults(spec.id))
            if release:
                pipe.release.set()
            return pipe

        def used_bytes(self):
            return 0

    return FakeCache()


# ---------------------------------------------------------------- bad bodies, for every dialect's fuzz test


def broken_bodies() -> list[bytes]:
    """Bodies that are no JSON object, or JSON that no strict parser takes: broken syntax, NaN and
    Infinity, numbers too large or too long, nesting too deep, not UTF-8, a BOM, UTF-16, NUL bytes,
    trailing data, a lone surrogate."""
    return [b"", b" ", b"\n", b"not json", b"{", b"}", b'{"prompt": "x",}', b"{'prompt': 'x'}", b"[]", b'"x"', b"1",
            b"null", b"true", b"1e999", b'{"prompt": NaN}', b'{"prompt": "x", "guidance": NaN}',
            b'{"prompt": "x", "guidance": Infinity}', b'{"prompt": "x", "guidance": -Infinity}',
            b'{"prompt": "x", "strength": 1e999}', b'{"prompt": "x", "seed": -1e999}',
            b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", b'{"prompt": "x", "width": ' + b"2" * 101 + b"}",
            b"[" * 100000 + b"]" * 100000, b'{"prompt": "x", "seed": ' + b"[" * 50000 + b"]" * 50000 + b"}",
            b'{"a":' * 30000 + b"1" + b"}" * 30000, b'{"prompt": "\xff\xfe"}', b"\xef\xbb\xbf" + b'{"prompt": "x"}',
            '{"prompt": "x"}'.encode("utf-16"), b"\x00" * 100, b'{"prompt": "x"} trailing', b'{"prompt": "x"}{}',
            b'{"prompt": "x", "prompt": 5}', b'{"prompt": "\\ud800"}', b'{"prompt": "x", "image": [1, 2, }']


def random_json(rng, depth: int, keys: list[str]):
    """A random JSON value: numbers, text, constants, arrays and objects (whose names are drawn from `keys`)."""
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
        return [random_json(rng, depth - 1, keys) for _ in range(int(rng.integers(0, 4)))]
    return {keys[int(rng.integers(0, len(keys)))]: random_json(rng, depth - 1, keys)
            for _ in range(int(rng.integers(0, 4)))}
