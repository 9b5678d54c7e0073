"""Shared helpers for the parity tests against diffusers / transformers."""

import math

import numpy as np
import torch
import torch.nn as nn
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, UniPCMultistepScheduler)

from sd import clip as sd_clip
from sd import unet as sd_unet
from sd import vae as sd_vae
from sd.schedule import ScheduleConfig

# sd's sampler name -> its diffusers twin: the scheduler class and the settings that pick the sampler
# among that class's algorithms (a test checks sd's registry names the same).
TWINS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "lcm": (LCMScheduler, {}),
}

# The samplers test_pipeline.py and test_sdxl.py sweep, by the diffusers class they swap in with from_config
# (every other twin's images: test_sampler_images.py).
SAMPLERS = {name: TWINS[name][0] for name in ("ddim", "euler", "euler_a", "dpmpp_2m")}


def twin_from_config(sampler: str, config, **settings):
    """`sampler`'s diffusers twin built from a pipeline's scheduler config, as a user swaps schedulers."""
    cls, picks = TWINS[sampler]
    return cls.from_config(config, **picks, **settings)

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


@torch.no_grad()
def randomize_params(module: nn.Module, seed: int = 0, bias_std: float = 0.05, norm_std: float = 0.1,
                     embed_std: float = 0.5) -> nn.Module:
    """Overwrite every parameter of `module` with seeded random values, so no layer is trivially
    identity (or zero) and a swapped / skipped layer changes the output.

    - norm layers: weight ~ 1 + N(0, norm_std), bias ~ N(0, norm_std)
    - embeddings: N(0, embed_std)
    - other weights (>= 2 dims): N(0, 1 / fan_in), which keeps activations O(1) through deep stacks
    - other biases / vectors: N(0, bias_std)
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(p):
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)

    done = set()
    for mod in module.modules():
        if isinstance(mod, NORM_TYPES):
            if mod.weight is not None:
                mod.weight.copy_(1.0 + norm_std * randn(mod.weight))
                done.add(id(mod.weight))
            if mod.bias is not None:
                mod.bias.copy_(norm_std * randn(mod.bias))
                done.add(id(mod.bias))
        elif isinstance(mod, nn.Embedding):
            mod.weight.copy_(embed_std * randn(mod.weight))
            done.add(id(mod.weight))
    for p in module.parameters():
        if id(p) in done:
            continue
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(randn(p) / math.sqrt(fan_in))
        else:
            p.copy_(bias_std * randn(p))
    return module


def max_diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max |ref|)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    abs_diff = (ours - ref).abs().max().item()
    return abs_diff, abs_diff / max(ref.abs().max().item(), 1e-30)


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4, name: str = "") -> None:
    """fp32 parity: max |ours - ref| <= rel * max |ref| (tolerance relative to the output's scale).
    Also checks shape, dtype and finiteness, and that the reference is not degenerate."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    assert torch.isfinite(ref).all() and torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = ref.detach().abs().max().item()
    assert scale > 1e-3, f"{name}: reference output is degenerate (max |ref| = {scale})"
    abs_diff, rel_diff = max_diff(ours, ref)
    report(name, abs_diff, rel_diff)
    assert abs_diff <= rel * scale, f"{name}: max |diff| {abs_diff:.3e} > {rel:g} * max |ref| ({scale:.3e})"


def report(name: str, abs_diff: float, rel_diff: float) -> None:
    # Visible with `pytest -s`; handy to see how much headroom the tolerance has.
    print(f"[parity] {name}: max abs diff {abs_diff:.3e}, relative to max |ref| {rel_diff:.3e}")


def assert_same_norms(ours: nn.Module, ref: nn.Module, converted: dict) -> int:
    """Check every normalisation layer of `ours` against its counterpart in `ref` (found by following
    our norm weight through `converted`, the reference state dict built from ours): same type, eps,
    groups and shape. Numerics at O(1) activations can't see an eps of 1e-5 vs 1e-6; this can.
    Returns the number of norm layers checked."""
    where = {(v.data_ptr(), tuple(v.shape)): k for k, v in converted.items()}
    checked = 0
    for name, mod in ours.named_modules():
        if not isinstance(mod, NORM_TYPES):
            continue
        key = where[(mod.weight.data_ptr(), tuple(mod.weight.shape))]
        assert key.endswith(".weight"), key
        ref_mod = ref.get_submodule(key[: -len(".weight")])
        assert type(ref_mod) is type(mod), f"{name} is {type(mod).__name__}, reference {key}: {type(ref_mod).__name__}"
        assert mod.eps == ref_mod.eps, f"{name}: eps {mod.eps} != {ref_mod.eps} ({key})"
        if isinstance(mod, nn.GroupNorm):
            assert (mod.num_groups, mod.num_channels) == (ref_mod.num_groups, ref_mod.num_channels), name
        if isinstance(mod, nn.LayerNorm):
            assert mod.normalized_shape == ref_mod.normalized_shape, name
        checked += 1
    assert checked, "no norm layers found"
    return checked


# ---------------------------------------------------------------- schedulers

def diffusers_scheduler(sampler: str, cfg: ScheduleConfig, schedule: str = "default", **options):
    """The diffusers scheduler `sampler` stands for on `schedule` ("default", or one of the
    use_*_sigmas flags' schedules), every setting explicit (DESIGN.md pitfall: schedulers built
    in memory remember which settings were defaults). `options`: the sd sampler's own options that
    are scheduler settings in diffusers (solver_type, order)."""
    if sampler == "dpmpp_2m_karras":
        sampler, schedule = "dpmpp_2m", "karras"
    flags = {f"use_{name}_sigmas": schedule == name for name in ("karras", "exponential", "beta")}
    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        trained_betas=None,
        prediction_type=cfg.prediction_type,
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
        rescale_betas_zero_snr=False,
    )
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=cfg.set_alpha_to_one,
                             thresholding=False)
    if sampler == "euler":
        return EulerDiscreteScheduler(**common, **flags,
                                      interpolation_type="linear", timestep_type="discrete",
                                      final_sigmas_type="zero")
    if sampler == "euler_a":
        return EulerAncestralDiscreteScheduler(**common)
    if sampler in ("heun", "dpm_2", "dpm_2_ancestral", "lms"):
        return TWINS[sampler][0](**{k: v for k, v in common.items() if k != "rescale_betas_zero_snr"}, **flags)
    if sampler == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small", clip_sample=False, thresholding=False)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        return DPMSolverMultistepScheduler(
            **common, **TWINS[sampler][1], solver_order=options.get("order", 2),
            solver_type=options.get("solver_type", "midpoint"),
            lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
            **flags,
            thresholding=False)
    if sampler == "unipc":
        return UniPCMultistepScheduler(
            **common, solver_order=options.get("order", 2), solver_type=options.get("solver_type", "bh2"),
            predict_x0=True, lower_order_final=True, disable_corrector=[], final_sigmas_type="zero",
            thresholding=False, **flags)
    if sampler == "deis":
        return DEISMultistepScheduler(
            **{k: v for k, v in common.items() if k != "rescale_betas_zero_snr"}, solver_order=options.get("order", 2),
            algorithm_type="deis", solver_type="logrho", lower_order_final=True, thresholding=False, **flags)
    if sampler == "plms":  # SD 1.5's own scheduler, in the PLMS form SD's config selects
        return PNDMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
            beta_schedule=cfg.beta_schedule, trained_betas=None, skip_prk_steps=True,
            set_alpha_to_one=cfg.set_alpha_to_one, prediction_type=cfg.prediction_type,
            timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)
    if sampler == "lcm":
        return LCMScheduler(**common, original_inference_steps=cfg.original_inference_steps,
                            timestep_scaling=cfg.timestep_scaling, clip_sample=False,
                            set_alpha_to_one=cfg.set_alpha_to_one, thresholding=False)
    raise AssertionError(sampler)


def sd15(**kw) -> ScheduleConfig:
    """SD 1.5's scheduler settings (explicit, so the test does not lean on sd's defaults)."""
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                prediction_type="epsilon", timestep_spacing="leading")
    return ScheduleConfig(**{**base, **kw})


# ---------------------------------------------------------------- whole images

PIXEL_TOL = 0.51  # uint8 (rounded) vs float * 255: an exact match is <= 0.5


def assert_same_image(ours, ref: np.ndarray, name: str) -> float:
    """`ours`: PIL image from sd; `ref`: diffusers' (H, W, 3) float image in [0, 1]."""
    a = np.asarray(ours, dtype=np.float64)
    b = ref.astype(np.float64) * 255
    assert ours.mode == "RGB", f"{name}: mode {ours.mode}"
    assert a.shape == b.shape, f"{name}: shape {a.shape} != reference {b.shape}"
    # The reference must be a real picture, not a flat or saturated one, or the comparison proves little.
    inside = ((b > 0.5) & (b < 254.5)).mean()
    assert b.std() > 10 and inside > 0.5, f"{name}: degenerate reference (std {b.std():.1f}, {inside:.0%} unclamped)"
    diff = np.abs(a - b)
    print(f"[parity] {name}: max |ours - ref*255| = {diff.max():.4f}, mean {diff.mean():.4f}")
    assert diff.max() <= PIXEL_TOL, (f"{name}: max pixel difference {diff.max():.3f} > {PIXEL_TOL} "
                                     f"({(diff > PIXEL_TOL).mean():.1%} of values differ)")
    return float(diff.max())


def tiny_sd15_components(text_width: int = 64, in_channels: int = 4, time_cond_proj_dim: int | None = None) -> dict:
    """A tiny SD 1.5-shaped diffusers pipeline's parts (attention on the second level only), every
    parameter random. `in_channels=9` makes an inpainting UNet; `time_cond_proj_dim` an
    LCM-distilled one that takes the guidance embedding."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer
    from transformers import CLIPTextModel as HFCLIPTextModel

    from sd.tokenizer import ASSETS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32)
    text_encoder = HFCLIPTextModel(CLIPTextConfig(
        hidden_size=text_width, intermediate_size=37, num_attention_heads=1, num_hidden_layers=3,
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"))
    for seed, model in enumerate((unet, vae, text_encoder)):
        randomize_params(model, seed=seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


# ---------------------------------------------------------------- shared settings and models of the image tests

# The SD 1.5 image tests' prompt and settings (test_pipeline, test_img2img, test_lcm).
PROMPT = "a red circle on a blue square"
NEGATIVE = "blurry, low quality"
STEPS, GUIDANCE, SEED = 6, 6.0, 3

# SD 1.5's scheduler settings, every value stated (a scheduler built in memory remembers which values
# were defaults and `X.from_config` would replace those with X's own defaults).
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
                     set_alpha_to_one=False)

# Long prompts (test_prompts, test_prompt_images).
# Comma-separated phrases (no ". ; :", which compel also splits at). SD15_LONG: 103 tokens, commas at
# 68 and 78, so A1111 and compel cut after the 69th token (plain slicing: 75). SDXL_LONG: 176 tokens;
# the first window ends on a comma (75th token), so it is also what a 77-token truncation reads (compel
# takes SDXL's pooled output from that); the second ends after its comma at 146 (72 tokens, not 75).
SD15_LONG = ", ".join([
    "a cosy cabin in the snowy woods", "warm light in the windows", "smoke rising from the chimney",
    "pine trees heavy with snow", "a frozen lake in front", "mountains behind", "starry night sky", "aurora borealis",
    "highly detailed", "digital painting", "soft colours", "by a famous artist", "trending on an art site",
    "wide angle", "sharp focus", "dramatic lighting with long blue shadows and drifting mist",
    "a wooden sled by the door", "a red scarf on a fence post", "footprints in the fresh powder", "an owl watching"])
SDXL_LONG = ", ".join(SD15_LONG.split(", ")[:15] + [
    "dramatic lighting", "cinematic composition", "a wooden sled by the door", "a red scarf on a fence post",
    "footprints in the fresh powder", "an owl watching from a branch", "a fox hiding behind a rock",
    "icicles hanging from the roof", "a lantern glowing on the porch", "a pile of firewood",
    "a snowman with a carrot nose and a tall black hat", "children playing far away", "a distant little village",
    "church bells ringing", "a quiet winter evening", "oil on canvas", "masterpiece", "best quality",
    "a feeling of peace and calm"])

# The SDXL image tests' (test_sdxl, test_sdxl_modes). "!" is bigG's padding token: a prompt containing it
# must still pool at the first end-of-text token.
XL_PROMPT = "a red circle on a blue square!"
XL_NEGATIVE = "blurry, low quality!!"
XL_STEPS, XL_GUIDANCE, XL_SEED = 4, 5.0, 3

# The official SDXL scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0), DDIM's options included.
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                      interpolation_type="linear", use_karras_sigmas=False, clip_sample=False, set_alpha_to_one=False,
                      skip_prk_steps=True, sample_max_value=1.0)

# Tiny models that follow the families' rules, which single-file loading relies on (configs inferred from
# shapes): SD 1.5's 8 heads per UNet level, SDXL's 64 channels per head (UNet and both text encoders),
# CLIP heads = width // 64, GroupNorm with 32 groups.
TEXT_WIDTH = 64                      # every tiny text encoder: CLIP-L and bigG alike
CONTEXT_DIM = 2 * TEXT_WIDTH         # SDXL conditions on both penultimate hidden states, side by side
TIME_EMBED_DIM = 8                   # per size/crop number (SDXL: 256)
ADM_IN = TEXT_WIDTH + 6 * TIME_EMBED_DIM  # bigG pooled + 6 size/crop numbers (SDXL: 1280 + 6 * 256 = 2816)


def save_folder(models: dict, scheduler, path):
    """A tiny SD 1.5 diffusers folder: `models` (tiny_sd15_components) and `scheduler`, save_pretrained."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**models, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def tokenizers():
    """SDXL's two tokenizers: the second pads with "!" (id 0), the first with <|endoftext|>."""
    from transformers import CLIPTokenizer

    from sd.tokenizer import ASSETS
    return (CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77),
            CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77, pad_token="!"))


def tiny_sdxl_unet(**kw):
    """The tiny SDXL UNet of the diffusers folders: attention on the second level only (as SDXL's first
    level), two transformer layers there and in the middle, heads = channels // 64 (SDXL's rule)."""
    from diffusers import UNet2DConditionModel
    cfg = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=(1, 2),  # diffusers' legacy name: these are head counts
               transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=CONTEXT_DIM,
               addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
               projection_class_embeddings_input_dim=ADM_IN, norm_num_groups=32)
    return UNet2DConditionModel(**{**cfg, **kw})


def hf_text_config(act: str, **kw):
    """A tiny transformers CLIPTextConfig (CLIP-L's quick_gelu, or bigG's gelu with a projection)."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=37, num_attention_heads=TEXT_WIDTH // 64,
                          num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77, hidden_act=act, **kw)


def picture(w=64, h=48, seed=0):
    """Smooth colour gradients plus noise: a picture the VAE's round trip visibly changes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200 + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------- our own tiny models, for single files

# SD 1.5: attention at both levels (the folder models have it at the second level only).
UNET_TINY = sd_unet.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 1),
                               mid_transformer_depth=1, heads=(8, 8), context_dim=TEXT_WIDTH, norm_groups=32)
VAE_TINY = sd_vae.VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=2, norm_groups=32)
CLIP_TINY = dict(width=TEXT_WIDTH, layers=3, heads=1, mlp_width=37)
CLIP_TINY_CFG = sd_clip.CLIPConfig(**CLIP_TINY)

# SDXL.
UNET_XL = sd_unet.UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 2),
                             mid_transformer_depth=2, heads=(1, 2), context_dim=CONTEXT_DIM, linear_proj=True,
                             adm_in_channels=ADM_IN, norm_groups=32)
VAE_XL = sd_vae.VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=2, norm_groups=32, scaling_factor=0.13025)
CLIP_L_TINY = sd_clip.CLIPConfig(width=TEXT_WIDTH, layers=3, heads=1, mlp_width=37, act="quick_gelu")
BIG_G_TINY = sd_clip.CLIPConfig(width=TEXT_WIDTH, layers=3, heads=1, mlp_width=37, act="gelu",
                                projection_dim=TEXT_WIDTH)

# The official single files' prefixes, as the tests state them.
UNET_KEY, VAE_KEY, TEXT_KEY = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
CLIP_L_KEY, BIG_G_KEY = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


# ---------------------------------------------------------------- VAE pairs

# Tiny VAE configs (test_vae, test_vae_tiling).
VAE_CONFIGS = {
    "mult12-res1-g8": sd_vae.VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                       image_channels=3, norm_groups=8, scaling_factor=0.18215),
    "mult122-res2-g32": sd_vae.VAEConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, latent_channels=4,
                                         image_channels=3, norm_groups=32, scaling_factor=0.13025),
    "mult122-res1-g16-lat8": sd_vae.VAEConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                              latent_channels=8, image_channels=3, norm_groups=16, scaling_factor=0.5),
}


def diffusers_vae_config(cfg) -> dict:
    n = len(cfg.channel_mult)
    return dict(in_channels=cfg.image_channels, out_channels=cfg.image_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
                layers_per_block=cfg.num_res_blocks, latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_groups, sample_size=32, scaling_factor=cfg.scaling_factor)


def vae_pair(cfg, seed=0, logvar_shift=0.0):
    """Our AutoencoderKL of `cfg`, random, and diffusers' with the same weights (through its own
    convert_ldm_vae_checkpoint), its norms checked to match ours."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(seed)
    ours = randomize_params(sd_vae.AutoencoderKL(cfg), seed=seed).eval()
    if logvar_shift:
        with torch.no_grad():
            ours.quant_conv.bias[cfg.latent_channels:] += logvar_shift
    config = diffusers_vae_config(cfg)
    return ours, with_our_weights(DiffusersAutoencoderKL(**config), ours, convert_ldm_vae_checkpoint,
                                  "first_stage_model.", config)


def with_our_weights(ref, ours, convert, prefix: str, config: dict):
    """diffusers' model `ref`, on its plain (non-SDPA) attention path, holding `ours`' weights as
    diffusers' own single-file converter `convert` reads them under the official `prefix`: every
    tensor converted once, every norm matching ours."""
    from diffusers.models.attention_processor import AttnProcessor
    ref = ref.eval()
    ref.set_attn_processor(AttnProcessor())
    sd = ours.state_dict()
    converted = convert({prefix + k: v for k, v in sd.items()}, config)
    assert len(converted) == len(sd), "the converter dropped or duplicated some of our tensors"
    ref.load_state_dict(converted, strict=True)
    assert_same_norms(ours, ref, converted)
    return ref
