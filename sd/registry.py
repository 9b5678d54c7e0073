"""The Workers AI text-to-image models: where their official weights live, what each is for,
and the defaults each takes.

Weights live under `<weights dir>/<last part of the id>/`; `overrides` (the CLI's
`--model ID=SOURCE`) point an id at any single file or diffusers folder instead.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

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
    defaults: dict                    # sd.defaults.Defaults fields: what a request omits takes these
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
              dict(width=1024, height=1024, num_steps=20, guidance=7.5, strength=1.0, inpaint_strength=1.0)),
    # Lightning shares the base file's text encoders and VAE: stored once, and loaded once when both run.
    ModelSpec("@cf/bytedance/stable-diffusion-xl-lightning", "SDXL-Lightning, 4-step UNet: text to image in 4 steps",
              "txt2img", SDXL_FILE + _files("ByteDance/SDXL-Lightning", "stable-diffusion-xl-lightning",
                                            "sdxl_lightning_4step_unet.safetensors"),
              "stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors",
              dict(width=1024, height=1024, num_steps=4, guidance=0.0, strength=1.0, inpaint_strength=1.0),
              unet="stable-diffusion-xl-lightning/sdxl_lightning_4step_unet.safetensors", lightning_steps=4),
    # The model card swaps in LCMScheduler and runs 15 steps at guidance 2 (the folder's own scheduler is not LCM).
    ModelSpec("@cf/lykon/dreamshaper-8-lcm", "Dreamshaper 8 with LCM-LoRA fused: text to image in few steps",
              "txt2img", _files("Lykon/dreamshaper-8-lcm", "dreamshaper-8-lcm", *SD_FOLDER), "dreamshaper-8-lcm",
              dict(width=512, height=512, num_steps=15, guidance=2.0, strength=1.0, inpaint_strength=1.0,
                   sampler="lcm")),
    ModelSpec("@cf/runwayml/stable-diffusion-v1-5-img2img", "Stable Diffusion 1.5: image to image (text to image "
              "without an image)", "img2img",
              _files("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5-img2img",
                     "v1-5-pruned-emaonly.safetensors"),
              "stable-diffusion-v1-5-img2img/v1-5-pruned-emaonly.safetensors",
              dict(width=512, height=512, num_steps=20, guidance=7.5, strength=1.0, inpaint_strength=1.0)),
    ModelSpec("@cf/runwayml/stable-diffusion-v1-5-inpainting", "Stable Diffusion 1.5 inpainting: repaint the white "
              "part of a mask", "inpainting",
              _files("stable-diffusion-v1-5/stable-diffusion-inpainting", "stable-diffusion-v1-5-inpainting",
                     *SD_FOLDER),
              "stable-diffusion-v1-5-inpainting",
              dict(width=512, height=512, num_steps=20, guidance=7.5, strength=1.0, inpaint_strength=1.0),
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
            raise InputError(f"--model: expected ID=SOURCE, got {pair!r}")
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


def with_registry_defaults(pipe, spec: ModelSpec):
    """The pipeline with the registry's defaults, so sd.load("@cf/...") and the server agree."""
    return pipe.with_defaults(**spec.defaults, keep_unmasked=spec.keep_unmasked)


def load_model(model_id: str, registry: Registry | None = None, *, device=None, dtype=None, compile=False):
    """A Pipeline for a registry id, with the registry's defaults."""
    from .pipeline import load
    registry = registry or Registry()
    spec = spec_of(model_id)
    if registry.missing(model_id):
        raise WeightsMissing(registry.missing_message(model_id))
    source, unet = registry.sources(model_id)
    pipe = load(source, unet=unet, device=device, dtype=dtype, lightning_steps=spec.lightning_steps, compile=compile)
    return with_registry_defaults(pipe, spec)


def download(model_id: str, registry: Registry, *, progress=True) -> list[Path]:
    """Fetch the model's official files from the Hugging Face Hub into the weights dir
    (resumable; files already complete are skipped). HF_TOKEN is used when set."""
    from .download import download_file, hub_url
    spec = spec_of(model_id)
    if model_id in registry.overrides:
        raise InputError(f"{model_id}: points at {registry.overrides[model_id]} (--model); nothing to download")
    return [download_file(hub_url(f.repo, f.path), registry.weights_dir / f.folder / f.path, progress=progress)
            for f in spec.files]
