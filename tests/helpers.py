"""Shared helpers for the parity tests against diffusers / transformers."""

import math

import numpy as np
import torch
import torch.nn as nn
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, UniPCMultistepScheduler)

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
