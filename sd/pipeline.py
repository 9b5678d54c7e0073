"""Pipeline: prompt -> text embeddings -> sampler over latents -> VAE decode -> PIL image."""

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .clip import CLIPTextModel
from .denoiser import Denoiser, classifier_free_guidance
from .samplers import SAMPLER_FUNCTIONS, randn
from .schedule import SAMPLERS, SCHEDULER_CLASSES, ScheduleConfig, make_schedule, train_sigmas
from .tokenizer import ASSETS, Tokenizer
from .unet import UNet
from .vae import AutoencoderKL
from .weights import Checkpoint, build, read_diffusers_folder, read_single_file

DEFAULT_STEPS = 50       # as diffusers' StableDiffusionPipeline
DEFAULT_GUIDANCE = 7.5


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline:
    def __init__(self, checkpoint: Checkpoint, device: str, dtype: torch.dtype):
        self.family, self.device, self.dtype = checkpoint.family, torch.device(device), dtype
        self.unet = build(UNet, *checkpoint.unet, "UNet", checkpoint.family)
        self.vae = build(AutoencoderKL, *checkpoint.vae, "VAE", checkpoint.family)
        self.text_encoders = [build(CLIPTextModel, cfg, sd, "text encoder", checkpoint.family)
                              for cfg, sd in checkpoint.text_encoders]
        self.tokenizer = Tokenizer(checkpoint.tokenizer_dir or ASSETS)
        self.schedule_config: ScheduleConfig = checkpoint.schedule
        # A folder's scheduler class picks the default sampler; one we don't implement falls back to Euler.
        self.default_sampler = SCHEDULER_CLASSES.get(checkpoint.scheduler_class, "euler")
        if self.default_sampler == "dpmpp_2m" and self.schedule_config.use_karras_sigmas:
            self.default_sampler = "dpmpp_2m_karras"
        self.sample_size = checkpoint.sample_size or 512
        self.latent_scale = 2 ** (len(self.vae.cfg.channel_mult) - 1)

    # ------------------------------------------------------------ conditioning

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """SD 1.5: CLIP-L's last hidden state after the final layer norm, (B, 77, 768)."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoders[0](ids).last_hidden_state

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompt: str, *, negative_prompt: str | None = None, width: int | None = None,
                 height: int | None = None, num_steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, sampler: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Image.Image:
        """Text to image. Omitted settings take the model's defaults; `seed=None` picks one at random
        (find it in `pipe.last_settings`). CFG runs only when guidance > 1."""
        settings = self._check(prompt, negative_prompt, width, height, num_steps, guidance, seed, sampler)
        self.last_settings = settings
        w, h, steps, g, name = (settings[k] for k in ("width", "height", "num_steps", "guidance", "sampler"))
        generator = torch.Generator("cpu").manual_seed(settings["seed"])
        schedule = make_schedule(name, self.schedule_config, steps)

        # Initial noise first: the same draws, in the same order, as diffusers.
        shape = (1, self.vae.cfg.latent_channels, h // self.latent_scale, w // self.latent_scale)
        x = randn(shape, generator, self.device) * schedule.noise_scale

        use_cfg = g > 1
        texts = [negative_prompt or "", prompt] if use_cfg else [prompt]
        context = self.encode_prompts(texts)
        cond = {"context": context[-1:]}
        uncond = {"context": context[:1]} if use_cfg else None
        model = classifier_free_guidance(self._unet, cond, uncond, g)
        denoiser = Denoiser(model, schedule, train_sigmas(self.schedule_config), self.schedule_config.prediction_type)

        sample = SAMPLER_FUNCTIONS[name]
        landing = schedule.landing.to(self.device) if schedule.landing is not None else None
        x = sample(denoiser, x, schedule.sigmas.to(self.device), generator=generator, landing=landing,
                   progress=progress)
        return self.decode(schedule.to_latents(x))[0]

    def _unet(self, x, t, context):
        return self.unet(x.to(self.dtype), t, context).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        image = self.vae.decode((latents / self.vae.cfg.scaling_factor).to(self.dtype)).float()
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in (image * 255).round().astype(np.uint8)]

    def _check(self, prompt, negative_prompt, width, height, num_steps, guidance, seed, sampler) -> dict:
        """Validate the request and fill in defaults; errors name the field and the rule."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: must be a string, got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt: must be a string, got {type(negative_prompt).__name__}")
        width = self.sample_size if width is None else width
        height = self.sample_size if height is None else height
        multiple = max(8, self.latent_scale)
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name}: must be a positive multiple of {multiple}, got {value!r}")
        num_steps = DEFAULT_STEPS if num_steps is None else num_steps
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: must be a whole number of at least 1, got {num_steps!r}")
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        if not isinstance(guidance, (int, float)) or not np.isfinite(guidance):
            raise ValueError(f"guidance: must be a finite number, got {guidance!r}")
        if seed is None:
            seed = random.randrange(2 ** 32)
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed: must be a whole number in [0, 2**64), got {seed!r}")
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        return dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                    num_steps=num_steps, guidance=float(guidance), seed=seed, sampler=sampler)


def load(source: str | Path, *, unet: str | Path | None = None, device: str | None = None,
         dtype: torch.dtype | str | None = None) -> Pipeline:
    """A Pipeline from a single-file checkpoint (.safetensors, official key names) or a
    diffusers-layout folder (has model_index.json). Weights are read straight into `dtype`
    on `device` (defaults: CUDA in float16 when available, else the CPU in float32)."""
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype) or _bad_dtype(dtype)
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    if unet is not None:
        raise ValueError("unet: replacing the UNet is not supported yet")
    path = Path(source)
    if str(source).startswith("@cf/"):
        raise ValueError(f"source: Workers AI model ids ({source}) need the model registry, not available yet; "
                         "pass a .safetensors file or a diffusers folder")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path}: a folder source must be in the diffusers layout "
                                    "(model_index.json missing)")
        checkpoint = read_diffusers_folder(path, device, dtype)
    elif path.is_file():
        checkpoint = read_single_file(path, device, dtype)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder. Download a checkpoint, e.g. "
                                "v1-5-pruned-emaonly.safetensors from "
                                "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5, "
                                "into weights/ (see weights/README.md)")
    return Pipeline(checkpoint, device, dtype)


def _bad_dtype(name):
    raise ValueError(f"dtype: {name!r} is not one of float32, float16, bfloat16")
