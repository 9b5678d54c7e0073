"""Pipeline: prompt -> text embeddings -> sampler over latents -> VAE decode -> PIL image."""

import copy
import random
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .clip import CLIPTextModel
from .denoiser import Denoiser, classifier_free_guidance, lcm_boundary_condition
from .images import ImageInput, fit_image, image_tensor, mask_tensor, paste_unmasked, read_image, working_size
from .samplers import SAMPLER_FUNCTIONS, randn
from .schedule import SAMPLERS, SCHEDULER_CLASSES, make_schedule, train_sigmas
from .tokenizer import ASSETS, EOS, Tokenizer
from .unet import UNet, timestep_embedding
from .vae import AutoencoderKL
from .weights import (Checkpoint, build, read_diffusers_folder, read_single_file, read_unet_file,
                      unet_config_from_weights)

DEFAULT_STEPS = 50       # as diffusers' StableDiffusionPipeline
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # as diffusers' img2img and inpainting pipelines
LCM_STEPS = 4            # as diffusers' LatentConsistencyModelPipeline
# LCM-distilled UNets take the guidance scale as an input (diffusers' LCM pipeline default);
# LCM-LoRA-fused models work best with little or no CFG (LCM-LoRA's model cards: 1 to 2).
LCM_GUIDANCE = {"distilled": 8.5, "lora": 1.0}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline:
    def __init__(self, checkpoint: Checkpoint, device: str, dtype: torch.dtype):
        self.family, self.device, self.dtype = checkpoint.family, torch.device(device), dtype
        self.unet = build(UNet, *checkpoint.unet, "UNet", checkpoint.family)
        # SDXL's published VAE overflows to inf/NaN in float16: it decodes in float32 unless its
        # config says it is safe (force_upcast false, e.g. the fp16-fix VAE).
        self.vae_dtype = torch.float32 if checkpoint.vae_force_upcast and dtype == torch.float16 else dtype
        self.vae = build(AutoencoderKL, *checkpoint.vae, "VAE", checkpoint.family).to(self.vae_dtype)
        self.text_encoders = [build(CLIPTextModel, cfg, sd, "text encoder", checkpoint.family)
                              for cfg, sd in checkpoint.text_encoders]
        # CLIP-L pads with <|endoftext|>; SDXL's OpenCLIP bigG with "!".
        self.tokenizers = [Tokenizer(d or ASSETS, pad_token=EOS if i == 0 else "!")
                           for i, d in enumerate(checkpoint.tokenizer_dirs or [None])]
        self.schedule_config = checkpoint.schedule
        # A folder's scheduler class picks the default sampler; one we don't implement falls back to Euler.
        self.default_sampler = SCHEDULER_CLASSES.get(checkpoint.scheduler_class, "euler")
        if self.default_sampler == "dpmpp_2m" and self.schedule_config.use_karras_sigmas:
            self.default_sampler = "dpmpp_2m_karras"
        self.default_steps, self.default_guidance = DEFAULT_STEPS, DEFAULT_GUIDANCE
        self.default_strength, self.default_keep_unmasked = dict(DEFAULT_STRENGTH), False
        if self.default_sampler == "lcm":
            self.default_steps = LCM_STEPS
            self.default_guidance = LCM_GUIDANCE["distilled" if self.unet.cfg.time_cond_proj_dim else "lora"]
        preset = checkpoint.defaults
        self.default_sampler = preset.get("sampler", self.default_sampler)
        self.default_steps = preset.get("num_steps", self.default_steps)
        self.default_guidance = preset.get("guidance", self.default_guidance)
        self.sample_size = checkpoint.sample_size or 512
        # The VAE runs in tiles of the native size (diffusers' enable_tiling) when this is True, or
        # when None and the image is over twice the native area: an untiled 2048x2048 decode holds
        # activations of 128 channels x 2048 x 2048 (2 GiB each in float32), a tiled one those
        # of a single native-size tile.
        self.vae_tiling: bool | None = None
        self._own_defaults = (self.schedule_config, self.default_sampler, self.default_steps, self.default_guidance)

    def with_unet(self, path: str | Path, *, lightning_steps: int | None = None) -> "Pipeline":
        """A pipeline that shares this one's text encoders, tokenizers and VAE (no copy, no
        reload) and runs another UNet: from a UNet-only file (either naming) or a full single
        file of the same family, of which only the UNet is read. Lightning defaults as `load`."""
        state = read_unet_file(path, self.device, self.dtype)
        other = copy.copy(self)
        other.unet = build(UNet, unet_config_from_weights(state, self.family), state, "UNet", str(path))
        other.schedule_config, other.default_sampler, other.default_steps, other.default_guidance = \
            self._own_defaults
        steps = lightning_steps if lightning_steps is not None else lightning_steps_from_name(path)
        if steps:
            other.use_lightning(steps)
        return other

    def use_lightning(self, steps: int):
        """SDXL-Lightning (Lin et al. 2024): Euler on "trailing" timesteps, no CFG, the step count
        the UNet was distilled for; the 1-step UNet predicts the sample itself."""
        prediction = "sample" if steps == 1 else self.schedule_config.prediction_type
        self.schedule_config = replace(self.schedule_config, timestep_spacing="trailing", prediction_type=prediction)
        self.default_sampler, self.default_steps, self.default_guidance = "euler", steps, 0.0

    # ------------------------------------------------------------ conditioning

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SD 1.5: CLIP-L's last hidden state after the final layer norm, (B, 77, 768).
        SDXL: the penultimate hidden states of CLIP-L and bigG side by side, (B, 77, 2048),
        and bigG's projected pooled output, (B, 1280)."""
        outs = [enc(tok(prompts).to(self.device)) for enc, tok in zip(self.text_encoders, self.tokenizers)]
        if self.family != "sdxl":
            return outs[0].last_hidden_state, None
        return torch.cat([o.hidden_states[-2] for o in outs], dim=-1), outs[-1].pooled

    def size_vector(self, pooled: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """SDXL's `y`: pooled text embedding, then the six size/crop numbers, each embedded
        sinusoidally (original height, width; crop top, left; target height, width)."""
        per_number = (self.unet.cfg.adm_in_channels - pooled.shape[-1]) // len(sizes)
        numbers = torch.tensor(sizes, dtype=torch.float32, device=pooled.device)
        return torch.cat([pooled, timestep_embedding(numbers, per_number).reshape(1, -1).to(pooled.dtype)], dim=-1)

    def conditioning(self, prompt, negative_prompt, use_cfg, sizes) -> tuple[dict, dict | None]:
        """UNet inputs for the prompt and, with CFG, for the negative prompt. With no negative
        prompt SD 1.5 encodes "" and SDXL uses zeros (diffusers' force_zeros_for_empty_prompt)."""
        if self.family != "sdxl":
            context, _ = self.encode_prompts([prompt, negative_prompt or ""] if use_cfg else [prompt])
            return {"context": context[:1]}, ({"context": context[1:]} if use_cfg else None)
        negative = use_cfg and negative_prompt is not None
        context, pooled = self.encode_prompts([prompt, negative_prompt] if negative else [prompt])
        cond = {"context": context[:1], "y": self.size_vector(pooled[:1], sizes)}
        if not use_cfg:
            return cond, None
        if negative:
            return cond, {"context": context[1:], "y": self.size_vector(pooled[1:], sizes)}
        return cond, {"context": torch.zeros_like(cond["context"]),
                      "y": self.size_vector(torch.zeros_like(pooled[:1]), sizes)}

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompt: str, *, negative_prompt: str | None = None, width: int | None = None,
                 height: int | None = None, num_steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, sampler: str | None = None,
                 image: ImageInput | None = None, mask: ImageInput | None = None, strength: float | None = None,
                 keep_unmasked: bool | None = None,
                 original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Image.Image:
        """Text to image; with `image`, image to image; with `image` and `mask`, inpainting.
        Omitted settings take the model's defaults; `seed=None` picks one at random (find it in
        `pipe.last_settings`). CFG runs only when guidance > 1.

        image, mask: PIL images, the bytes of image files, or paths. The image is resized to
            width x height (a side not given: the image's own, rounded down to a multiple of 8).
            Mask white = repaint, black = keep, thresholded at 0.5.
        strength: how much of the schedule runs, from the image noised to that level:
            int(num_steps * strength) steps (diffusers' rule), so 1 is almost pure generation and
            small strengths stay close to the input; when that is 0 steps the input comes back
            as it is. Default 0.8 for img2img, 1 for inpainting.
        keep_unmasked: paste the input's own pixels back outside the mask (soft edge inside
            it), since the VAE round trip otherwise changes them slightly. Default off (on for
            the Workers AI inpainting model).

        SDXL only: `original_size`, `crop_top_left`, `target_size` ((height, width), (top, left),
        (height, width)) condition on the training images' size and crop; by default the image's
        own size, no crop, as diffusers."""
        if keep_unmasked is None:
            keep_unmasked = self.default_keep_unmasked and mask is not None
        picture, mask_image = self._read_inputs(image, mask, keep_unmasked)
        if picture is not None:
            width, height = working_size(picture, width, height, max(8, self.vae.scale))
        settings = self._check(prompt, negative_prompt, width, height, num_steps, guidance, seed, sampler,
                               strength, picture is not None, mask_image is not None)
        w, h, steps, g, name = (settings[k] for k in ("width", "height", "num_steps", "guidance", "sampler"))
        sizes = self._sizes(original_size, crop_top_left, target_size, h, w)
        if sizes:
            settings.update(original_size=sizes[:2], crop_top_left=sizes[2:4], target_size=sizes[4:])
        if mask_image is not None:
            settings["keep_unmasked"] = keep_unmasked
        self.last_settings = settings
        generator = torch.Generator("cpu").manual_seed(settings["seed"])
        schedule = make_schedule(name, self.schedule_config, steps)

        init = fit_image(picture, w, h) if picture is not None else None
        mask_pixels = mask_tensor(mask_image, w, h, picture.size) if mask_image is not None else None
        if init is not None:
            # diffusers' strength rule: skip the noisiest steps, run int(steps * strength).
            start = steps - int(steps * settings["strength"])
            if start == steps:
                return init
            schedule = schedule.from_step(start)
        x, unet_inputs, after_step = self._start(schedule, generator, (1, self.vae.cfg.latent_channels,
                                                 h // self.vae.scale, w // self.vae.scale),
                                                 init, mask_pixels, settings.get("strength"))

        # LCM-distilled UNets take the guidance weight as an input instead of a CFG batch.
        distilled = bool(self.unet.cfg.time_cond_proj_dim)
        use_cfg = g > 1 and not distilled
        cond, uncond = self.conditioning(prompt, negative_prompt, use_cfg, sizes)
        if distilled:
            unet_inputs["w"] = torch.tensor([g - 1], device=self.device)
        for inputs in (cond, uncond) if uncond is not None else (cond,):
            inputs.update(unet_inputs)
        model = classifier_free_guidance(self._unet, cond, uncond, g)
        denoiser = Denoiser(model, schedule, train_sigmas(self.schedule_config), self.schedule_config.prediction_type)
        if name == "lcm":
            denoiser = lcm_boundary_condition(denoiser, self.schedule_config.timestep_scaling)

        sample = SAMPLER_FUNCTIONS[name]
        landing = schedule.landing.to(self.device) if schedule.landing is not None else None
        x = sample(denoiser, x, schedule.sigmas.to(self.device), generator=generator, landing=landing,
                   progress=progress, after_step=after_step)
        result = self.decode(schedule.to_latents(x))[0]
        return paste_unmasked(result, init, mask_pixels) if keep_unmasked else result

    def _start(self, schedule, generator, shape, init, mask, strength):
        """Starting latents (sigma space), extra UNet inputs and a between-steps hook for each
        mode, drawing from the generator in diffusers' order: image latents, noise, masked-image
        latents."""
        sigmas = schedule.sigmas.to(self.device)
        if init is None:
            return randn(shape, generator, self.device) * schedule.noise_scale, {}, None
        pixels = image_tensor(init).to(self.device)
        nine_channel = mask is not None and self.unet.cfg.in_channels == 9
        latents = self.encode(pixels, generator) if not nine_channel or strength < 1 else None
        noise = randn(shape, generator, self.device)
        if mask is not None and strength == 1:
            x = noise * schedule.noise_scale  # diffusers' inpainting starts from pure noise at strength 1
        else:
            x = latents + noise * sigmas[0]
        if mask is None:
            return x, {}, None

        mask = mask.to(self.device)
        latent_mask = F.interpolate(mask, size=shape[-2:])  # nearest, as diffusers
        if nine_channel:
            # SD inpainting UNet input: latents, then the mask, then the latents of the image with
            # the repainted region blanked (grey, 0 in [-1, 1]).
            masked_latents = self.encode(pixels * (mask < 0.5), generator)
            return x, {"concat": torch.cat([latent_mask, masked_latents], dim=1)}, None

        # A plain UNet: diffusers encodes the masked image here all the same, drawing from the
        # generator; draw the same numbers so seeds keep matching.
        randn(shape, generator, self.device)

        def keep_known_region(i: int, x: torch.Tensor) -> torch.Tensor:
            """After step i, put back the image latents noised (with the starting noise) to where
            the step landed; after the last step the clean latents, as diffusers does."""
            s = sigmas[i + 1]
            known = latents + noise * s if i < len(sigmas) - 2 else latents * (1 + s ** 2) ** 0.5
            return (1 - latent_mask) * known + latent_mask * x
        return x, {}, keep_known_region

    def _unet(self, x, t, context, y=None, w=None, concat=None):
        """The UNet on x at timestep t; `concat` adds channels to x (the inpainting UNet's mask
        and masked-image latents)."""
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        return self.unet(x.to(self.dtype), t, context, y, w).float()

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents, sampled from the VAE's posterior as diffusers."""
        posterior = self.vae.encode(pixels.to(self.vae_dtype), tile=self.vae_tile(*pixels.shape[-2:]))
        return (posterior.sample(generator) * self.vae.cfg.scaling_factor).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        tile = self.vae_tile(*(side * self.vae.scale for side in latents.shape[-2:]))
        image = self.vae.decode((latents / self.vae.cfg.scaling_factor).to(self.vae_dtype), tile=tile).float()
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in (image * 255).round().astype(np.uint8)]

    def vae_tile(self, height: int, width: int) -> int | None:
        """The VAE's tile side in latent pixels for an image of this size; None: all at once."""
        tiled = height * width > 2 * self.sample_size ** 2 if self.vae_tiling is None else self.vae_tiling
        return self.sample_size // self.vae.scale if tiled else None

    def _sizes(self, original_size, crop_top_left, target_size, h, w) -> tuple[int, ...] | None:
        if self.family != "sdxl":
            if original_size is not None or target_size is not None or tuple(crop_top_left) != (0, 0):
                raise ValueError("original_size / crop_top_left / target_size: only SDXL models take size conditioning")
            return None
        values = {"original_size": original_size or (h, w), "crop_top_left": crop_top_left,
                  "target_size": target_size or (h, w)}
        for name, pair in values.items():
            if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                    or not all(isinstance(v, int) and 0 <= v <= 16384 for v in pair)):
                raise ValueError(f"{name}: must be two whole numbers in [0, 16384], got {pair!r}")
        return tuple(v for pair in values.values() for v in pair)

    def _read_inputs(self, image, mask, keep_unmasked):
        if mask is not None and image is None:
            raise ValueError("mask: needs an image to inpaint (pass image= as well)")
        if not isinstance(keep_unmasked, bool):
            raise ValueError(f"keep_unmasked: must be true or false, got {keep_unmasked!r}")
        if keep_unmasked and mask is None:
            raise ValueError("keep_unmasked: only applies to inpainting (pass a mask)")
        if self.unet.cfg.in_channels == 9 and mask is None:
            raise ValueError("mask: this is an inpainting model (9-channel UNet); it needs an image and a mask")
        picture = read_image(image, "image") if image is not None else None
        return picture, read_image(mask, "mask") if mask is not None else None

    def _check(self, prompt, negative_prompt, width, height, num_steps, guidance, seed, sampler,
               strength=None, has_image=False, has_mask=False) -> dict:
        """Validate the request and fill in defaults; errors name the field and the rule."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: must be a string, got {type(prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt: must be a string, got {type(negative_prompt).__name__}")
        width = self.sample_size if width is None else width
        height = self.sample_size if height is None else height
        multiple = max(8, self.vae.scale)
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name}: must be a positive multiple of {multiple}, got {value!r}")
        num_steps = self.default_steps if num_steps is None else num_steps
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: must be a whole number of at least 1, got {num_steps!r}")
        guidance = self.default_guidance if guidance is None else guidance
        if not isinstance(guidance, (int, float)) or not np.isfinite(guidance):
            raise ValueError(f"guidance: must be a finite number, got {guidance!r}")
        if seed is None:
            seed = random.randrange(2 ** 32)
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed: must be a whole number in [0, 2**64), got {seed!r}")
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        settings = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                        num_steps=num_steps, guidance=float(guidance), seed=seed, sampler=sampler)
        if strength is not None and not has_image:
            raise ValueError("strength: only applies with an image (img2img or inpainting)")
        if has_image:
            strength = self.default_strength["inpaint" if has_mask else "img2img"] if strength is None else strength
            if (not isinstance(strength, (int, float)) or isinstance(strength, bool)
                    or not 0 <= strength <= 1):
                raise ValueError(f"strength: must be a number in [0, 1], got {strength!r}")
            settings["strength"] = float(strength)
        return settings


def lightning_steps_from_name(path: str | Path) -> int | None:
    """`sdxl_lightning_4step_unet.safetensors` -> 4."""
    m = re.search(r"lightning_(\d+)step", Path(path).name, re.IGNORECASE)
    return int(m[1]) if m else None


def load(source: str | Path, *, unet: str | Path | None = None, device: str | None = None,
         dtype: torch.dtype | str | None = None, lightning_steps: int | None = None,
         compile: bool = False) -> Pipeline:
    """A Pipeline from a single-file checkpoint (.safetensors, official key names), a
    diffusers-layout folder (has model_index.json), or a Workers AI model id (`@cf/...`, read
    from $SD_WEIGHTS_DIR as laid out by `sd download`, with that model's defaults). Weights are
    read straight into `dtype` on `device` (defaults: CUDA in float16 when available, else the
    CPU in float32).

    `unet`: a UNet-only file (either naming) that replaces the source's UNet, as SDXL-Lightning
    ships. `lightning_steps`: the step count a Lightning UNet was distilled for; read from the
    file name (`..._4step_...`) when not given. `compile`: run the UNet and the VAE decoder
    through torch.compile (the first generate at each size pays for compiling)."""
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype) or _bad_dtype(dtype)
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    path = Path(source)
    if str(source).startswith("@cf/"):
        if unet is not None or lightning_steps is not None:
            raise ValueError("source: a Workers AI model id brings its own UNet and settings; "
                             "unet= and lightning_steps= apply to files and folders")
        from .models import load_model
        return load_model(str(source), device=device, dtype=dtype)
    if lightning_steps is not None and (not isinstance(lightning_steps, int) or lightning_steps < 1):
        raise ValueError(f"lightning_steps: must be a whole number of at least 1, got {lightning_steps!r}")
    unet_sd = read_unet_file(unet, device, dtype) if unet is not None else None
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path}: a folder source must be in the diffusers layout "
                                    "(model_index.json missing)")
        checkpoint = read_diffusers_folder(path, device, dtype, unet_sd)
    elif path.is_file():
        checkpoint = read_single_file(path, device, dtype, unet_sd)
    else:
        raise FileNotFoundError(f"{path}: no such file or folder. Download a checkpoint, e.g. "
                                "v1-5-pruned-emaonly.safetensors from "
                                "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5, "
                                "into weights/ (see weights/README.md)")
    pipe = Pipeline(checkpoint, device, dtype)
    steps = lightning_steps if lightning_steps is not None else lightning_steps_from_name(unet or source)
    if steps:
        pipe.use_lightning(steps)
    if compile:
        # On the CPU, freezing lets inductor fold the weights in as constants and prepack them
        # for oneDNN: the compiled UNet step then takes 0.83x the eager time, 1.04x without it.
        options = {"freezing": True} if pipe.device.type == "cpu" else None
        pipe.unet.compile(options=options)
        pipe.vae.decoder.compile(options=options)
    return pipe


def _bad_dtype(name):
    raise ValueError(f"dtype: {name!r} is not one of float32, float16, bfloat16")
