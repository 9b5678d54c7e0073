"""Pipeline: prompt -> text embeddings -> sampler over latents -> VAE decode -> PIL image.

`generate` is the whole thing; `denoiser`, `sigmas`, `noise` and `decode` are its parts, public
so that research code can run its own loop on them.
"""

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import defaults as model_defaults
from . import lora
from . import prompts
from .clip import CLIPTextModel
from .defaults import Defaults
from .denoiser import Denoiser, both_halves, classifier_free_guidance, custom_guidance, lcm_boundary_condition
from .errors import InputError
from .images import ImageInput, fit_image, image_tensor, mask_tensor, paste_unmasked, read_image, working_size
from .request import Request, check
from .samplers import randn, resolve
from .schedule import Schedule, make_schedule, train_sigmas
from .tokenizer import ASSETS, EOS, Tokenizer
from .unet import DeepCache, UNet, timestep_embedding
from .vae import AutoencoderKL
from .weights import (Checkpoint, CheckpointError, build, read_diffusers_folder, read_single_file, read_unet_file,
                      replacement_config)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Latents:
    """generate(..., output="latent"): the final latents, (B, C, H/8, W/8), scaled as the UNet
    sees them (diffusers' output_type="latent"), and each image's settings.
    `pipe.decode(latents)` turns them into pictures."""
    tensor: torch.Tensor
    settings: list[dict]


class Pipeline:
    def __init__(self, checkpoint: Checkpoint, device: str, dtype: torch.dtype):
        self.family, self.device, self.dtype = checkpoint.family, torch.device(device), dtype
        source = checkpoint.source or checkpoint.family
        check_components_fit(checkpoint)
        self.unet = build(UNet, *checkpoint.unet, "UNet", source)
        # SDXL's published VAE overflows to inf/NaN in float16: it decodes in float32 unless its
        # config says it is safe (force_upcast false, e.g. the fp16-fix VAE).
        self.vae_dtype = torch.float32 if checkpoint.vae_force_upcast and dtype == torch.float16 else dtype
        self.vae = build(AutoencoderKL, *checkpoint.vae, "VAE", source).to(self.vae_dtype)
        self.text_encoders = [build(CLIPTextModel, cfg, sd, "text encoder", source)
                              for cfg, sd in checkpoint.text_encoders]
        # CLIP-L pads with <|endoftext|>; SDXL's OpenCLIP bigG with "!".
        self.tokenizers = [Tokenizer(d or ASSETS, pad_token=EOS if i == 0 else "!")
                           for i, d in enumerate(checkpoint.tokenizer_dirs or [None])]
        self.schedule_config = self.checkpoint_schedule = checkpoint.schedule
        self.preset = checkpoint.preset  # sd/tiny.py's name for a file's extra settings; sd.save writes it back
        self.sample_size = checkpoint.sample_size or 512  # the native size, which VAE tiles take
        self.defaults = self.checkpoint_defaults = model_defaults.from_checkpoint(
            checkpoint.scheduler_class, checkpoint.scheduler, self.sample_size, self.distilled, checkpoint.defaults)
        # The VAE runs in tiles of the native size (diffusers' enable_tiling) when this is True, or
        # when None and the image is over twice the native area: an untiled 2048x2048 decode holds
        # activations of 128 channels x 2048 x 2048 (2 GiB each in float32), a tiled one those
        # of a single native-size tile.
        self.vae_tiling: bool | None = None

    @property
    def distilled(self) -> bool:
        """An LCM-distilled UNet takes the guidance weight as an input instead of a CFG batch."""
        return bool(self.unet.cfg.time_cond_proj_dim)

    # ------------------------------------------------------------ views sharing the weights

    def with_defaults(self, **changes) -> "Pipeline":
        """A pipeline on the same weights whose defaults differ in `changes`."""
        other = copy.copy(self)
        other.defaults = replace(self.defaults, **changes)
        return other

    def with_unet(self, path: str | Path, *, lightning_steps: int | None = None) -> "Pipeline":
        """A pipeline that shares this one's text encoders, tokenizers and VAE (no copy, no
        reload) and runs another UNet: from a UNet-only file (either naming) or a full single
        file of the same family, of which only the UNet is read. Lightning defaults as `load`;
        otherwise the checkpoint's own defaults."""
        state = read_unet_file(path, self.device, self.dtype)
        other = copy.copy(self)
        other.unet = build(UNet, replacement_config(self.unet.cfg, state, self.family, path), state, "UNet", str(path))
        other.schedule_config, other.defaults = self.checkpoint_schedule, self.checkpoint_defaults
        if other.defaults.sampler == "lcm" and other.distilled != self.distilled:
            other.defaults = model_defaults.for_lcm(other.defaults, other.distilled)
        steps = lightning_steps if lightning_steps is not None else lightning_steps_from_name(path)
        return other.lightning(steps) if steps else other

    def lightning(self, steps: int) -> "Pipeline":
        """SDXL-Lightning (Lin et al. 2024): Euler on "trailing" timesteps, no CFG, the step count
        the UNet was distilled for; the 1-step UNet predicts the sample itself."""
        other = copy.copy(self)
        prediction = "sample" if steps == 1 else self.schedule_config.prediction_type
        other.schedule_config = replace(self.schedule_config, timestep_spacing="trailing", prediction_type=prediction)
        other.defaults = model_defaults.for_lightning(self.defaults, steps)
        return other

    def load_lora(self, source: "str | Path | dict", scale: float = 1.0) -> "Pipeline":
        """Merge a LoRA into this pipeline's UNet and text encoders, in place (sd/lora.py): a kohya-ss
        or diffusers / PEFT .safetensors file (or its tensors as a dict), its changes times `scale`.
        LoRAs stack; each changed weight is recomputed from the weight as loaded, in float32, cast
        once, so nothing is paid per step. Every tensor must find its layer, or nothing is merged and
        a LoraError (an InputError) lists those that did not. The LoRA is merged into the modules, so
        pipelines sharing them have it too: all those made by with_defaults and lightning, and the
        text encoders of those made by with_unet. With compile=True, pass LoRAs to load(loras=...):
        compiling with frozen weights folds them into the code at the first image."""
        lora.apply(self.unet, self.text_encoders, source, scale, self.family)
        return self

    def unload_loras(self) -> "Pipeline":
        """Put back the weights as loaded, the very tensors (bit for bit), in this pipeline's UNet
        and text encoders: every LoRA merged into them goes, whichever pipeline merged it."""
        lora.unload([self.unet, *self.text_encoders])
        return self

    # ------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_prompts(self, texts: list[str], *, clip_skip: int | None | list[int | None] = None,
                       style: str = "plain") -> prompts.PromptEmbeddings:
        """(B, T, C) text embeddings (and SDXL's pooled vectors) for a batch of prompts; see sd/prompts.py."""
        return prompts.encode(self.text_encoders, self.tokenizers, self.family == "sdxl", texts,
                              style=style, clip_skip=clip_skip)

    def size_vector(self, pooled: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """SDXL's `y`: pooled text embedding, then the six size/crop numbers, each embedded
        sinusoidally (original height, width; crop top, left; target height, width)."""
        per_number = (self.unet.cfg.adm_in_channels - pooled.shape[-1]) // len(sizes)
        numbers = torch.tensor(sizes, dtype=torch.float32, device=pooled.device)
        embedded = timestep_embedding(numbers, per_number).reshape(1, -1).to(pooled.dtype)
        return torch.cat([pooled, embedded.expand(len(pooled), -1)], dim=-1)

    def conditioning(self, request: Request, use_cfg: bool) -> tuple[dict, dict | None, list[int]]:
        """UNet inputs for the prompts and, with CFG, for the negative prompts, plus the tokens
        each prompt had past the encoders' window. With no negative prompt SD 1.5 encodes ""
        and SDXL uses zeros (diffusers' force_zeros_for_empty_prompt)."""
        B, sdxl = request.batch_size, self.family == "sdxl"
        negatives = [n or "" for n in request.negative_prompts]
        zeros = sdxl and all(n is None for n in request.negative_prompts)
        texts = list(request.prompts) + (negatives if use_cfg and not zeros else [])
        # diffusers skips CLIP layers for the prompts only, never for the negative prompts.
        skips = [request.clip_skip] * B + [None] * (len(texts) - B)
        emb = self.encode_prompts(texts, clip_skip=skips, style=request.prompt_style)
        dropped = emb.dropped[:B]

        def inputs(rows: slice, zero: bool = False) -> dict:
            context = emb.context[rows] if not zero else torch.zeros_like(emb.context[:B])
            if not sdxl:
                return {"context": context}
            pooled = emb.pooled[rows] if not zero else torch.zeros_like(emb.pooled[:B])
            return {"context": context, "y": self.size_vector(pooled, request.sizes)}

        cond = inputs(slice(0, B))
        if not use_cfg:
            return cond, None, dropped
        return cond, inputs(slice(B, 2 * B), zero=zeros), dropped

    # ------------------------------------------------------------ the parts, public

    def sigmas(self, num_steps: int, *, sampler: str | None = None, schedule: str | None = None) -> torch.Tensor:
        """The (num_steps + 1,) descending noise levels `generate` would visit (the last where it
        ends, usually 0), for a sampler and schedule (default: the model's)."""
        return self.schedule(num_steps, sampler=sampler, schedule=schedule).sigmas

    def schedule(self, num_steps: int, *, sampler=None, schedule: str | None = None, sigmas=None) -> Schedule:
        """The whole schedule: sigmas plus the timestep the UNet is told at each (as the sampler's
        diffusers twin tells it) and the starting noise scale. Hand it to `denoiser(schedule=...)`
        to reproduce `generate` exactly; without it the denoiser interpolates timesteps."""
        name = sampler or self.defaults.sampler
        spec_name = name if isinstance(name, str) else "euler"  # samplers of one's own: Euler's timesteps
        _, implied = resolve(spec_name)
        return make_schedule(spec_name, self.schedule_config, num_steps, implied or schedule or self.defaults.schedule,
                             model="sdxl" if self.family == "sdxl" else "sd15", sigmas=sigmas)

    def noise(self, seed: int | list[int], width: int | None = None, height: int | None = None) -> torch.Tensor:
        """Unit Gaussian latents (B, C, height/8, width/8) on the pipeline's device, drawn from
        torch.Generator("cpu").manual_seed(seed) per image, as `generate` draws its start."""
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        width, height = width or self.defaults.width, height or self.defaults.height
        shape = (len(seeds), self.vae.cfg.latent_channels, height // self.vae.scale, width // self.vae.scale)
        return randn(shape, [torch.Generator("cpu").manual_seed(s) for s in seeds], self.device)

    def denoiser(self, prompt: str | list[str], *, negative_prompt=None, guidance=None, guidance_rescale: float = 0.0,
                 width: int | None = None, height: int | None = None, schedule: Schedule | None = None,
                 clip_skip: int | None = None, prompt_style: str | None = None, **sizes) -> Callable:
        """D(x, sigma) -> x0 for these prompts, with classifier-free guidance: the function every
        sampler takes. sigma is a scalar tensor or one per image, (B,), so k-diffusion's samplers
        run on it unchanged. `schedule` (from `pipe.schedule`) makes it tell the UNet exactly the
        timesteps `generate` would; without one, each sigma's timestep is interpolated. Not under
        no_grad: call it inside torch.enable_grad() and gradients flow back to x (gradient guidance)."""
        request = self._request(prompt=prompt, negative_prompt=negative_prompt, guidance=guidance,
                                guidance_rescale=guidance_rescale, width=width, height=height, clip_skip=clip_skip,
                                prompt_style=prompt_style, seed=0, **sizes)
        return self._denoiser(request, schedule, {})[0]

    @torch.inference_mode()
    def decode(self, latents: "torch.Tensor | Latents") -> list[Image.Image]:
        """Latents scaled as the UNet sees them (B, C, h, w) -> pictures."""
        if isinstance(latents, Latents):
            latents = latents.tensor
        tile = self.vae_tile(*(side * self.vae.scale for side in latents.shape[-2:]))
        image = self.vae.decode((latents / self.vae.cfg.scaling_factor).to(self.vae_dtype), tile=tile).float()
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in (image * 255).round().astype(np.uint8)]

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latents, sampled from the VAE's posterior as diffusers;
        with a list of generators, one sample per generator, (B, C, h, w)."""
        posterior = self.vae.encode(pixels.to(self.vae_dtype), tile=self.vae_tile(*pixels.shape[-2:]))
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        samples = torch.cat([posterior.sample(g) for g in generators])
        return (samples * self.vae.cfg.scaling_factor).float()

    def vae_tile(self, height: int, width: int) -> int | None:
        """The VAE's tile side in latent pixels for an image of this size; None: all at once."""
        tiled = height * width > 2 * self.sample_size ** 2 if self.vae_tiling is None else self.vae_tiling
        return self.sample_size // self.vae.scale if tiled else None

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 num_images: int | None = None, width: int | None = None, height: int | None = None,
                 num_steps: int | None = None, guidance: float | Callable | None = None, guidance_rescale: float = 0.0,
                 seed: int | list[int] | None = None, sampler: str | Callable | None = None,
                 schedule: str | None = None, sigmas=None, sampler_options: dict | None = None,
                 image: ImageInput | None = None, mask: ImageInput | None = None, strength: float | None = None,
                 keep_unmasked: bool | None = None, clip_skip: int | None = None, prompt_style: str | None = None,
                 original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, callback: Callable | None = None,
                 step_cache: int | dict | None = None, output: str = "pil") -> "Image.Image | list[Image.Image] | Latents":
        """Text to image; with `image`, image to image; with `image` and `mask`, inpainting.
        Omitted settings take the model's defaults (`pipe.defaults`). Each image's settings come
        back in `image.info["sd"]` (a dict; the PNG text chunk the CLI writes holds it as JSON).

        Batches: `num_images=N`, a list of prompts, or a list of seeds make one UNet batch and give
        a list of images; image k is the image its seed makes alone. One seed s with N images
        gives seeds s..s+N-1; `seed=None` draws one at random.

        guidance: classifier-free guidance scale (CFG runs when > 1), or a function
            (uncond x0, cond x0, sigma) -> x0 for a formula of one's own (both halves always run).
        guidance_rescale: Lin et al. 2024's rescale of the guided prediction, in [0, 1].
        sampler: a name (`sd.SAMPLERS`, or an alias such as dpmpp_2m_karras) or a function with
            the sampler contract (sd/samplers.py); `sampler_options` go to it, checked by name.
        schedule: "default" (the sampler's diffusers twin on the model's own spacing), or any of
            `sd.SCHEDULES`; `sigmas=` gives an explicit descending list instead.
        callback: called after every step with a `sd.samplers.Step` (i, n, sigma, sigma_next,
            x, denoised); a tensor it returns replaces x.
        image, mask: PIL images, the bytes of image files, or paths. The image is resized to
            width x height (a side not given: the image's own, rounded down to a multiple of 8).
            Mask white = repaint, black = keep, thresholded at 0.5.
        strength: how much of the schedule runs, from the image noised to that level:
            int(num_steps * strength) steps (diffusers' rule), so 1 is almost pure generation and
            small strengths stay close to the input; when that is 0 steps the input comes back
            as it is. Default 0.8 for img2img, 1 for inpainting.
        keep_unmasked: paste the input's own pixels back outside the mask (soft edge inside
            it), since the VAE round trip otherwise changes them slightly.
        clip_skip: use the text encoder's output that many layers before its last (diffusers'
            meaning). prompt_style: "plain" (diffusers') or another of sd.prompts.STYLES.
        step_cache: DeepCache (Ma et al. 2024): N runs the whole UNet every N-th call and only its
            shallow branch in between, on the deep features the last whole call left (about N
            times fewer deep-block FLOPs, a slightly different picture); {"interval": N,
            "depth": d} also sets how many input blocks the shallow branch keeps (default 2).
            Off by default.
        output: "pil" for pictures, "latent" for a `Latents` (decode with `pipe.decode`).

        SDXL only: `original_size`, `crop_top_left`, `target_size` ((height, width), (top, left),
        (height, width)) condition on the training images' size and crop; by default the image's
        own size, no crop, as diffusers."""
        picture, mask_image = self._read_inputs(image, mask)
        if picture is not None:
            width, height = working_size(picture, width, height, max(8, self.vae.scale))
        request = self._request(
            prompt=prompt, negative_prompt=negative_prompt, num_images=num_images, width=width, height=height,
            num_steps=num_steps, guidance=guidance, guidance_rescale=guidance_rescale, seed=seed, sampler=sampler,
            schedule=schedule, sigmas=sigmas, sampler_options=sampler_options, strength=strength,
            keep_unmasked=keep_unmasked, clip_skip=clip_skip, prompt_style=prompt_style, original_size=original_size,
            crop_top_left=crop_top_left, target_size=target_size, output=output, step_cache=step_cache,
            picture=picture, mask_image=mask_image)
        settings = [request.settings(k) for k in range(request.batch_size)]
        self.last_settings = settings[0]  # kept for old callers; races when threads share a pipeline
        w, h, steps = request.width, request.height, request.num_steps
        schedule = self.schedule(steps, sampler=request.sampler, schedule=request.schedule, sigmas=request.sigmas)

        init = fit_image(picture, w, h) if picture is not None else None
        mask_pixels = mask_tensor(mask_image, w, h, picture.size) if mask_image is not None else None
        if init is not None:
            # diffusers' strength rule: skip the noisiest steps, run int(steps * strength).
            start = len(schedule.timesteps) - int(len(schedule.timesteps) * request.strength)
            if start == len(schedule.timesteps):
                return self._result(request, settings, [init.copy() for _ in settings])
            schedule = schedule.from_step(start)
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        shape = (request.batch_size, self.vae.cfg.latent_channels, h // self.vae.scale, w // self.vae.scale)
        x, unet_inputs, blend = self._start(schedule, generators, shape, init, mask_pixels, request.strength)
        model, dropped = self._denoiser(request, schedule, unet_inputs)
        for k, n in enumerate(dropped):
            if n:
                settings[k]["prompt_tokens_dropped"] = n

        spec, _ = resolve(request.sampler) if isinstance(request.sampler, str) else (None, None)
        sample = spec.fn if spec else request.sampler
        # The sigmas stay on the CPU (as diffusers keeps its schedulers' sigmas): a sampler's scalar
        # arithmetic and comparisons on them then never wait for the device, which runs ahead.
        needs = {"landing": schedule.landing if schedule.landing is not None else None} \
            if spec and "landing" in spec.needs else {}
        x = sample(model, x, schedule.sigmas, generator=generators if len(generators) > 1 else
                   generators[0], callback=_chain(blend, callback), **needs, **request.sampler_options)
        latents = schedule.to_latents(x)
        if request.output == "latent":
            return Latents(latents, settings)
        images = self.decode(latents)
        if request.keep_unmasked:
            images = [paste_unmasked(im, init, mask_pixels) for im in images]
        return self._result(request, settings, images)

    def _request(self, picture=None, mask_image=None, **arguments) -> Request:
        return check(self.defaults, multiple=max(8, self.vae.scale), sdxl=self.family == "sdxl",
                     has_image=picture is not None, has_mask=mask_image is not None,
                     max_cache_depth=len(self.unet.input_blocks) - 1, **arguments)

    @staticmethod
    def _result(request: Request, settings: list[dict], images: list[Image.Image]):
        for im, s in zip(images, settings):
            im.info["sd"] = s
        return images if request.batched else images[0]

    def _denoiser(self, request: Request, schedule: Schedule, unet_inputs: dict) -> tuple[Callable, list[int]]:
        """The denoiser a run samples with: UNet -> guidance -> x0, plus LCM's boundary condition."""
        g, custom = request.guidance, callable(request.guidance)
        # LCM-distilled UNets take the guidance weight as an input instead of a CFG batch.
        use_cfg = not self.distilled and (custom or g > 1)
        cond, uncond, dropped = self.conditioning(request, use_cfg)
        if self.distilled:
            unet_inputs = {**unet_inputs, "w": torch.tensor([g - 1], device=self.device)}
        cond = {**cond, **unet_inputs}
        uncond = {**uncond, **unet_inputs} if uncond is not None else None
        table, prediction = train_sigmas(self.schedule_config), self.schedule_config.prediction_type
        unet = partial(self._unet, cache=DeepCache(*request.step_cache)) if request.step_cache else self._unet
        if custom:
            both = Denoiser(both_halves(unet, cond, uncond), schedule, table, prediction)
            denoiser = custom_guidance(both, g)
        else:
            model = classifier_free_guidance(unet, cond, uncond, g, request.guidance_rescale)
            denoiser = Denoiser(model, schedule, table, prediction)
        spec = resolve(request.sampler)[0] if isinstance(request.sampler, str) else None
        if spec is not None and spec.consistency:
            denoiser = lcm_boundary_condition(denoiser, self.schedule_config.timestep_scaling)
        return denoiser, dropped

    def _start(self, schedule, generators, shape, init, mask, strength):
        """Starting latents (sigma space), extra UNet inputs and a between-steps callback for each
        mode, drawing from each image's generator in diffusers' order: image latents, noise,
        masked-image latents."""
        sigmas = schedule.sigmas.to(self.device)
        if init is None:
            return randn(shape, generators, self.device) * schedule.noise_scale, {}, None
        pixels = image_tensor(init).to(self.device)
        nine_channel = mask is not None and self.unet.cfg.in_channels == 9
        draws = []  # per image: (latents, noise, masked-image latents)
        for g in generators:
            latents = self.encode(pixels, g) if not nine_channel or strength < 1 else None
            noise = randn((1, *shape[1:]), g, self.device)
            masked = self.encode(pixels * (mask.to(self.device) < 0.5), g) if nine_channel else None
            if mask is not None and not nine_channel:
                # A plain UNet: diffusers encodes the masked image here all the same, drawing from
                # the generator; draw the same numbers so seeds keep matching.
                randn((1, *shape[1:]), g, self.device)
            draws.append((latents, noise, masked))
        latents = torch.cat([d[0] for d in draws]) if draws[0][0] is not None else None
        noise = torch.cat([d[1] for d in draws])
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
            masked_latents = torch.cat([d[2] for d in draws])
            return x, {"concat": torch.cat([latent_mask.expand(len(x), -1, -1, -1), masked_latents], dim=1)}, None

        def keep_known_region(step) -> torch.Tensor:
            """After each step, put back the image latents noised (with the starting noise) to where
            the step landed; after the last step the clean latents, as diffusers does."""
            s = sigmas[step.i + 1]
            known = latents + noise * s if step.i < len(sigmas) - 2 else latents * (1 + s ** 2) ** 0.5
            return (1 - latent_mask) * known + latent_mask * step.x
        return x, {}, keep_known_region

    def _unet(self, x, t, context, y=None, w=None, concat=None, cache=None):
        """The UNet on x at timestep t; `concat` adds channels to x (the inpainting UNet's mask
        and masked-image latents)."""
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        return self.unet(x.to(self.dtype), t, context, y, w, cache).float()

    def _read_inputs(self, image, mask):
        if mask is not None and image is None:
            raise InputError("mask: needs an image to inpaint (pass image= as well)")
        if self.unet.cfg.in_channels == 9 and mask is None:
            raise InputError("mask: this is an inpainting model (9-channel UNet); it needs an image and a mask")
        picture = read_image(image, "image") if image is not None else None
        return picture, read_image(mask, "mask") if mask is not None else None


def check_components_fit(checkpoint: Checkpoint):
    """The parts must fit each other, whatever shapes the file gave them: the UNet works on the
    VAE's latents and attends to the text encoders' width."""
    unet, vae = checkpoint.unet[0], checkpoint.vae[0]
    text_width = sum(cfg.width for cfg, _ in checkpoint.text_encoders[-2:]) if checkpoint.family == "sdxl" \
        else checkpoint.text_encoders[0][0].width
    problems = []
    if unet.out_channels != vae.latent_channels:
        problems.append(f"the UNet predicts {unet.out_channels} channels, the VAE's latents have {vae.latent_channels}")
    if unet.in_channels not in (vae.latent_channels, 2 * vae.latent_channels + 1):
        problems.append(f"the UNet takes {unet.in_channels} input channels, not {vae.latent_channels} latent channels "
                        f"(or {2 * vae.latent_channels + 1} for inpainting)")
    if unet.context_dim != text_width:
        problems.append(f"the UNet attends to {unet.context_dim}-wide text, the text encoders give {text_width}")
    if problems:
        raise CheckpointError(f"{checkpoint.source or checkpoint.family}: its parts do not fit: " + "; ".join(problems))


def _chain(first: Callable | None, then: Callable | None) -> Callable | None:
    """One callback running `first` (the pipeline's own: inpainting's blend), then the caller's on
    what it left."""
    if first is None or then is None:
        return first or then

    def both(step):
        x = first(step)
        if x is not None:
            step = replace(step, x=x)
        out = then(step)
        return step.x if out is None else out
    return both


def lightning_steps_from_name(path: str | Path) -> int | None:
    """`sdxl_lightning_4step_unet.safetensors` -> 4."""
    m = re.search(r"lightning_(\d+)step", Path(path).name, re.IGNORECASE)
    return int(m[1]) if m else None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load(source: str | Path, *, unet: str | Path | None = None, device: str | None = None,
         dtype: torch.dtype | str | None = None, lightning_steps: int | None = None,
         compile: bool = False, loras: list | None = None) -> Pipeline:
    """A Pipeline from a single-file checkpoint (.safetensors, official key names), a
    diffusers-layout folder (has model_index.json), or a Workers AI model id (`@cf/...`, read
    from $SD_WEIGHTS_DIR as laid out by `sd download`, with that model's defaults). Weights are
    read straight into `dtype` on `device` (defaults: CUDA in float16 when available, else the
    CPU in float32).

    `unet`: a UNet-only file (either naming) that replaces the source's UNet, as SDXL-Lightning
    ships. `lightning_steps`: the step count a Lightning UNet was distilled for; read from the
    file name (`..._4step_...`) when not given. `compile`: run the UNet and the VAE decoder
    through torch.compile (the first generate at each size pays for compiling). `loras`: LoRA
    files merged once the model is built, each a path or a (path, scale) pair (Pipeline.load_lora)."""
    lora_files = lora.lora_entries(loras)  # checked before any weights are read
    device = device or default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"dtype: {dtype!r} is not one of float32, float16, bfloat16")
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    path = Path(source)
    if str(source).startswith("@cf/"):
        if unet is not None or lightning_steps is not None:
            raise InputError("source: a Workers AI model id brings its own UNet and settings; "
                             "unet= and lightning_steps= apply to files and folders")
        from .registry import load_model
        pipe = load_model(str(source), device=device, dtype=dtype, compile=compile)
        for path, scale in lora_files:
            pipe.load_lora(path, scale)
        return pipe
    if lightning_steps is not None and (not isinstance(lightning_steps, int) or lightning_steps < 1):
        raise InputError(f"lightning_steps: must be a whole number of at least 1, got {lightning_steps!r}")
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
    for path, scale in lora_files:
        pipe.load_lora(path, scale)
    steps = lightning_steps if lightning_steps is not None else lightning_steps_from_name(unet or source)
    if steps:
        pipe = pipe.lightning(steps)
    if compile:
        # On the CPU, freezing lets inductor fold the weights in as constants and prepack them
        # for oneDNN: the compiled UNet step then takes 0.83x the eager time, 1.04x without it.
        options = {"freezing": True} if pipe.device.type == "cpu" else None
        pipe.unet.compile(options=options)
        pipe.vae.decoder.compile(options=options)
    return pipe
