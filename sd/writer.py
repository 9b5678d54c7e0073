"""Writing checkpoints: the official single-file layout, and the diffusers folder layout that both
`sd.load` and diffusers' `from_pretrained` read.

What is written is what the modules hold now: weights memory-mapped from the source or converted
to another dtype, LoRAs merged in (sd/lora.py). Our modules are named after the single-file keys,
so a single file is their state dicts under each part's prefix; the diffusers names come from
sd/weights.py's rule tables, read the other way.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .clip import CLIPConfig
from .defaults import SCHEDULE_FLAGS
from .errors import InputError
from .pipeline import DTYPES
from .samplers import SAMPLERS
from .schedule import ScheduleConfig
from .tensorfile import STORED_DTYPES, StateDict
from .tiny import PRESET_KEY
from .tokenizer import ASSETS, BOS, CONTEXT_LENGTH, EOS
from .unet import UNetConfig
from .vae import VAEConfig
from .weights import (BIG_G_PREFIX, CLIP_L_PREFIX, DIFFUSERS_WEIGHTS, TEXT_ENCODER_WEIGHTS, TEXT_ENCODERS,
                      UNET_PREFIX, VAE_PREFIX, clip_config_to_diffusers, hf_text_model, hf_to_openclip,
                      unet_config_to_diffusers, unet_to_diffusers, vae_config_to_diffusers, vae_to_diffusers)

LAYOUTS = ("single-file", "diffusers")
STORED_NAMES = {dtype: name for name, dtype in STORED_DTYPES.items()}
LCM_ONLY = ("original_inference_steps", "timestep_scaling")  # ScheduleConfig's settings only LCMScheduler takes
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sd15_inpaint": "StableDiffusionInpaintPipeline",
                    "sdxl": "StableDiffusionXLPipeline"}


def save(pipe, path: str | Path, *, dtype: torch.dtype | str | None = None, layout: str = "single-file") -> Path:
    """Write `pipe`'s weights as its modules hold them now to `path`: one `.safetensors` file in the
    official layout, or with `layout="diffusers"` a diffusers folder (a new or empty one). `dtype`
    casts every floating-point tensor (torch.float16 halves a float32 file); by default each is
    written as held. A preset's name (sd/tiny.py) goes into a single file's metadata."""
    path, dtype = checked_destination(path, layout), checked_dtype(dtype)
    if layout == "diffusers":
        write_folder(pipe, path, dtype)
    else:
        write_single_file(path, pipe.unet, pipe.vae, pipe.text_encoders, dtype=dtype,
                          metadata={PRESET_KEY: pipe.preset} if pipe.preset else None)
    return path


def checked_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype is None or dtype in DTYPES.values():
        return dtype
    raise InputError(f"dtype: {dtype!r} is not one of float32, float16, bfloat16")


def checked_destination(path: str | Path, layout: str) -> Path:
    """`path` fit to write `layout` to, checked before any weights are touched."""
    path = Path(path)
    if layout not in LAYOUTS:
        raise InputError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "single-file":
        if path.suffix != ".safetensors":
            raise InputError(f"path: a single-file checkpoint is a .safetensors file, got {path}")
        if path.is_dir():
            raise InputError(f"path: {path} is a folder")
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"path: {path} exists and is not an empty folder (a diffusers folder is written afresh)")
    return path


# ---------------------------------------------------------------- the official single file

def single_file_tensors(unet, vae, text_encoders) -> StateDict:
    """The modules' tensors under their single-file names: SD 1.5 with one text encoder, SDXL with
    CLIP-L and bigG (written in OpenCLIP's names, as the official file has them)."""
    family = "sdxl" if len(text_encoders) == 2 else "sd15"
    tensors = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    tensors |= {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    tensors |= {CLIP_L_PREFIX[family] + k: v for k, v in hf_text_model(text_encoders[0].state_dict()).items()}
    if family == "sdxl":
        tensors |= {BIG_G_PREFIX + k: v for k, v in hf_to_openclip(text_encoders[1].state_dict()).items()}
    return tensors


def write_single_file(path: str | Path, unet, vae, text_encoders, *, dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> Path:
    """These modules as one official-layout file (see `save`, which takes a pipeline)."""
    return write_safetensors(path, single_file_tensors(unet, vae, text_encoders), dtype, metadata)


def write_safetensors(path: str | Path, tensors: StateDict, dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file (Hugging Face's format: an 8-byte little-endian header length, a JSON
    header of names, dtypes, shapes and byte ranges, then the raw little-endian data), floating-point
    tensors cast to `dtype`. One tensor is converted and written at a time, so a converted model
    never exists twice in memory. Written beside `path` and renamed over it once complete, so an
    interrupted write never leaves a partial file under the name."""
    path = Path(path)

    def stored(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    header, offset = {}, 0
    for key, t in tensors.items():
        size = t.numel() * stored(t).itemsize
        header[key] = {"dtype": STORED_NAMES[stored(t)], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            f.write(t.detach().to("cpu", stored(t)).contiguous().reshape(-1).view(torch.uint8).numpy())
    os.replace(part, path)
    return path


# ---------------------------------------------------------------- the diffusers folder

def write_folder(pipe, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """`pipe` as a diffusers folder: each component's weights, then its configs (`write_configs`), the
    scheduler of its default sampler on its schedule."""
    unet, vae, texts = pipe.unet, pipe.vae, pipe.text_encoders
    names = TEXT_ENCODERS[:len(texts)]
    weights = {f"unet/{DIFFUSERS_WEIGHTS}": unet_to_diffusers(unet.state_dict(), unet.cfg),
               f"vae/{DIFFUSERS_WEIGHTS}": vae_to_diffusers(vae.state_dict())}
    weights |= {f"{name}/{TEXT_ENCODER_WEIGHTS}": hf_text_model(t.state_dict()) for name, t in zip(names, texts)}
    for rel, tensors in weights.items():
        write_safetensors(folder / rel, tensors, dtype)
    scheduler = scheduler_config(pipe.defaults.sampler, pipe.defaults.schedule, pipe.schedule_config)
    return write_configs(folder, pipe.family, unet.cfg, vae.cfg, [t.cfg for t in texts], pipe.sample_size, scheduler)


def write_configs(folder: Path, family: str, unet: UNetConfig, vae: VAEConfig, texts: list[CLIPConfig],
                  sample_size: int, scheduler: dict) -> Path:
    """Everything of a diffusers folder but the weights: each component's config.json, the tokenizers
    (CLIP's vocabulary, shipped in sd/assets), scheduler_config.json and model_index.json. (Also what
    diffusers' from_single_file takes as `config=`, where it would otherwise fetch these from the Hub.)"""
    names = TEXT_ENCODERS[:len(texts)]
    pooled_width = texts[-1].projection_dim or texts[-1].width
    configs = {"unet/config.json": unet_config_to_diffusers(unet, sample_size // 2 ** (len(vae.channel_mult) - 1),
                                                            pooled_width),
               # diffusers decodes an SDXL VAE in float32 when it says force_upcast, as sd does (sd/weights.py)
               "vae/config.json": vae_config_to_diffusers(vae, sample_size, family == "sdxl"),
               "scheduler/scheduler_config.json": scheduler,
               "model_index.json": model_index(family, scheduler["_class_name"])}
    configs |= {f"{name}/config.json": clip_config_to_diffusers(cfg) for name, cfg in zip(names, texts)}
    for i, name in enumerate(names):
        # As the pipeline's tokenizers: CLIP-L pads with <|endoftext|>, bigG with "!".
        configs[f"{name.replace('text_encoder', 'tokenizer')}/tokenizer_config.json"] = {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "bos_token": BOS,
            "eos_token": EOS, "unk_token": EOS, "pad_token": EOS if i == 0 else "!"}
    for rel, config in configs.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(config, indent=2) + "\n")
    for name in names:
        for vocabulary in ("vocab.json", "merges.txt"):
            shutil.copyfile(ASSETS / vocabulary, folder / name.replace("text_encoder", "tokenizer") / vocabulary)
    return folder


def scheduler_config(sampler: str, schedule: str, config: ScheduleConfig) -> dict:
    """scheduler_config.json: the diffusers twin of `sampler` (Euler for one without a twin) on
    `schedule`, every setting stated, so that a reader's own defaults never step in (DDIM's
    clip_sample, for one)."""
    spec = SAMPLERS.get(sampler)
    twin, picks = (spec.twin, spec.twin_config) if spec and spec.twin else ("EulerDiscreteScheduler", {})
    flags = {flag: True for flag, name in SCHEDULE_FLAGS.items() if name == schedule}
    settings = {k: v for k, v in asdict(config).items() if twin == "LCMScheduler" or k not in LCM_ONLY}
    return {"_class_name": twin, **settings, **picks, **flags, "clip_sample": False}


def model_index(family: str, scheduler_class: str) -> dict:
    """model_index.json: the pipeline class and where each component's class comes from."""
    index = {"_class_name": PIPELINE_CLASSES[family], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler_class],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if family == "sdxl":
        return index | {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                        "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
    return index | {"safety_checker": [None, None], "feature_extractor": [None, None],
                    "requires_safety_checker": False}
