"""The Workers AI text-to-image models: where their official weights live, what each is for,
the defaults each takes, and a memory-bounded cache that loads them on first use.

Weights live under `<weights dir>/<last part of the id>/`; `overrides` (the CLI's
`--model ID=SOURCE`) point an id at any single file or diffusers folder instead.
"""

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .api import MAX_SIDE  # the API's limit on width and height
from .images import read_image

WEIGHTS_DIR_ENV = "SD_WEIGHTS_DIR"
SD_FOLDER = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
             "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
             "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class HubFile:
    repo: str     # Hugging Face Hub repository
    path: str     # file inside it
    folder: str   # the registry folder it is stored under (entries may share a file)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    description: str
    mode: str                         # "txt2img" (img2img with an image), "img2img", "inpainting"
    files: tuple[HubFile, ...]
    source: str                       # what sd.load reads, relative to the weights dir
    defaults: dict                    # generate() settings when a request omits them
    unet: str | None = None           # a replacement UNet file, relative to the weights dir
    lightning_steps: int | None = None
    needs: tuple[str, ...] = ()       # inputs a request must carry
    keep_unmasked: bool = False

    @property
    def folder(self) -> str:
        return self.id.rsplit("/", 1)[-1]


def _files(repo: str, folder: str, *paths: str) -> tuple[HubFile, ...]:
    return tuple(HubFile(repo, p, folder) for p in paths)


SDXL_BASE = "@cf/stabilityai/stable-diffusion-xl-base-1.0"
SDXL_FILE = _files("stabilityai/stable-diffusion-xl-base-1.0", "stable-diffusion-xl-base-1.0",
                   "sd_xl_base_1.0.safetensors")
_SPECS = [
    ModelSpec(SDXL_BASE, "SDXL 1.0 base: text to image (image to image with an image)", "txt2img", SDXL_FILE,
              "stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors",
              dict(width=1024, height=1024, num_steps=20, guidance=7.5, strength=1.0)),
    # Lightning shares the base file's text encoders and VAE: stored once, and loaded once when both run.
    ModelSpec("@cf/bytedance/stable-diffusion-xl-lightning", "SDXL-Lightning, 4-step UNet: text to image in 4 steps",
              "txt2img", SDXL_FILE + _files("ByteDance/SDXL-Lightning", "stable-diffusion-xl-lightning",
                                            "sdxl_lightning_4step_unet.safetensors"),
              "stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors",
              dict(width=1024, height=1024, num_steps=4, guidance=0.0, strength=1.0),
              unet="stable-diffusion-xl-lightning/sdxl_lightning_4step_unet.safetensors", lightning_steps=4),
    # The model card swaps in LCMScheduler and runs 15 steps at guidance 2 (the folder's own scheduler is not LCM).
    ModelSpec("@cf/lykon/dreamshaper-8-lcm", "Dreamshaper 8 with LCM-LoRA fused: text to image in few steps",
              "txt2img", _files("Lykon/dreamshaper-8-lcm", "dreamshaper-8-lcm", *SD_FOLDER), "dreamshaper-8-lcm",
              dict(width=512, height=512, num_steps=15, guidance=2.0, strength=1.0, sampler="lcm")),
    ModelSpec("@cf/runwayml/stable-diffusion-v1-5-img2img", "Stable Diffusion 1.5: image to image (text to image "
              "without an image)", "img2img",
              _files("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5-img2img",
                     "v1-5-pruned-emaonly.safetensors"),
              "stable-diffusion-v1-5-img2img/v1-5-pruned-emaonly.safetensors",
              dict(width=512, height=512, num_steps=20, guidance=7.5, strength=1.0)),
    ModelSpec("@cf/runwayml/stable-diffusion-v1-5-inpainting", "Stable Diffusion 1.5 inpainting: repaint the white "
              "part of a mask", "inpainting",
              _files("stable-diffusion-v1-5/stable-diffusion-inpainting", "stable-diffusion-v1-5-inpainting",
                     *SD_FOLDER),
              "stable-diffusion-v1-5-inpainting", dict(width=512, height=512, num_steps=20, guidance=7.5, strength=1.0),
              needs=("image", "mask"), keep_unmasked=True),
]
REGISTRY: dict[str, ModelSpec] = {spec.id: spec for spec in _SPECS}
DEFAULT_MODEL = "@cf/runwayml/stable-diffusion-v1-5-img2img"


class UnknownModel(KeyError):
    def __str__(self):
        return f"model: {self.args[0]!r} is not one of {', '.join(REGISTRY)}"


class WeightsMissing(FileNotFoundError):
    pass


def default_weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_DIR_ENV, "weights"))


def spec_of(model_id: str) -> ModelSpec:
    if model_id not in REGISTRY:
        raise UnknownModel(model_id)
    return REGISTRY[model_id]


def parse_overrides(pairs: list[str]) -> dict[str, Path]:
    """["@cf/x/y=path", ...] -> {id: path}; errors name the option."""
    out = {}
    for pair in pairs or []:
        model_id, sep, source = pair.partition("=")
        if not sep or not source:
            raise ValueError(f"--model: expected ID=SOURCE, got {pair!r}")
        spec_of(model_id)
        out[model_id] = Path(source)
    return out


@dataclass
class Registry:
    """The registry seen from one weights dir, with `--model` overrides."""
    weights_dir: Path = field(default_factory=default_weights_dir)
    overrides: dict[str, Path] = field(default_factory=dict)

    def missing(self, model_id: str) -> list[Path]:
        """Files the model needs that are not on disk (none when overridden by a source that exists)."""
        spec = spec_of(model_id)
        if model_id in self.overrides:
            source = self.overrides[model_id]
            return [] if source.exists() else [source]
        return [p for f in spec.files if not (p := self.weights_dir / f.folder / f.path).is_file()]

    def missing_message(self, model_id: str) -> str:
        if model_id in self.overrides:
            return f"{model_id}: no such file or folder {self.overrides[model_id]} (given with --model)"
        return (f"{model_id}: weights missing ({', '.join(str(p) for p in self.missing(model_id))}); "
                f"fetch them with: sd download {model_id}")

    def sources(self, model_id: str) -> tuple[Path, Path | None]:
        """(source for sd.load, replacement UNet or None)."""
        spec = spec_of(model_id)
        if model_id in self.overrides:
            return self.overrides[model_id], None
        return self.weights_dir / spec.source, (self.weights_dir / spec.unet if spec.unet else None)

    def describe(self) -> list[dict]:
        return [{"name": s.id, "description": s.description, "task": "Text-to-Image", "mode": s.mode,
                 "present": not self.missing(s.id), "missing": [str(p) for p in self.missing(s.id)],
                 "source": str(self.sources(s.id)[0])} for s in _SPECS]


def _modules(pipe) -> list:
    return [pipe.unet, pipe.vae, *pipe.text_encoders]


def _module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def pipeline_bytes(pipe) -> int:
    """The memory a pipeline's weights take, counting each module it holds."""
    return sum(map(_module_bytes, _modules(pipe)))


def memory_budget(device: str) -> int:
    """How much the cache may hold: 80% of the GPU's memory, or of the machine's RAM."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class Models:
    """Loads registry models on first use and keeps them, least recently used first out, while
    they fit in `max_bytes`. Entries reading the same base file share its text encoders and VAE."""

    def __init__(self, registry: Registry, device: str | None = None, dtype=None, max_bytes: int | None = None):
        from .pipeline import default_device
        self.registry, self.device, self.dtype = registry, device or default_device(), dtype
        self.max_bytes = max_bytes if max_bytes is not None else memory_budget(self.device)
        self.cache: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()  # loads and evictions come from the worker; status from anywhere

    def get(self, model_id: str):
        spec = spec_of(model_id)
        with self.lock:
            if model_id in self.cache:
                self.cache.move_to_end(model_id)
                return self.cache[model_id]
            if self.registry.missing(model_id):
                raise WeightsMissing(self.registry.missing_message(model_id))
            pipe = self._load(spec)
            self.cache[model_id] = pipe
            self._evict(keep=model_id)
            return pipe

    def _load(self, spec: ModelSpec):
        source, unet = self.registry.sources(spec.id)
        for other_id, other in self.cache.items():  # share encoders and VAE with a loaded sibling
            if source.is_file() and self.registry.sources(other_id)[0] == source:
                return apply_defaults(other.with_unet(unet or source, lightning_steps=spec.lightning_steps), spec)
        return load_model(spec.id, self.registry, device=self.device, dtype=self.dtype)

    def _evict(self, keep: str):
        while len(self.cache) > 1 and self.used_bytes() > self.max_bytes:
            oldest = next(k for k in self.cache if k != keep)
            del self.cache[oldest]
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()

    def used_bytes(self) -> int:
        """Weights held by the cache, a module shared by several pipelines counted once."""
        unique = {id(m): m for pipe in self.cache.values() for m in _modules(pipe)}
        return sum(map(_module_bytes, unique.values()))

    def generate(self, model_id: str, prompt: str, *, image=None, mask=None, width=None, height=None,
                 **settings) -> Image.Image:
        """generate() with the model's defaults for what the request leaves out; with an image,
        omitted sides come from it, scaled down to fit the API's 2048 limit."""
        spec = spec_of(model_id)
        for name, value in (("image", image), ("mask", mask)):
            if name in spec.needs and value is None:
                raise ValueError(f"{name}: required by {model_id} ({spec.mode})")
        image = read_image(image, "image") if image is not None else None
        mask = read_image(mask, "mask") if mask is not None else None
        if image is not None and (width is None or height is None):
            scale = min(1.0, MAX_SIDE / max(image.size))
            if scale < 1:
                w, h = (max(8, int(v * scale) // 8 * 8) for v in image.size)
                width, height = width or w, height or h
        return self.get(model_id).generate(prompt, image=image, mask=mask, width=width, height=height, **settings)


def apply_defaults(pipe, spec: ModelSpec):
    """The registry's defaults become the pipeline's own, so sd.load("@cf/...") and the server agree."""
    d = spec.defaults
    pipe.sample_size = d["width"]
    pipe.default_steps, pipe.default_guidance = d["num_steps"], d["guidance"]
    pipe.default_sampler = d.get("sampler", pipe.default_sampler)
    pipe.default_strength = {"img2img": d["strength"], "inpaint": d["strength"]}
    pipe.default_keep_unmasked = spec.keep_unmasked
    return pipe


def load_model(model_id: str, registry: Registry | None = None, *, device=None, dtype=None):
    """A Pipeline for a registry id, with the registry's defaults."""
    from .pipeline import load
    registry = registry or Registry()
    spec = spec_of(model_id)
    if registry.missing(model_id):
        raise WeightsMissing(registry.missing_message(model_id))
    source, unet = registry.sources(model_id)
    pipe = load(source, unet=unet, device=device, dtype=dtype, lightning_steps=spec.lightning_steps)
    return apply_defaults(pipe, spec)


def download(model_id: str, registry: Registry, *, progress=True) -> list[Path]:
    """Fetch the model's official files from the Hugging Face Hub into the weights dir
    (resumable; files already complete are skipped). HF_TOKEN is used when set."""
    from .download import download_file, hub_url
    spec = spec_of(model_id)
    if model_id in registry.overrides:
        raise ValueError(f"{model_id}: points at {registry.overrides[model_id]} (--model); nothing to download")
    return [download_file(hub_url(f.repo, f.path), registry.weights_dir / f.folder / f.path, progress=progress)
            for f in spec.files]
