"""Latent consistency models against diffusers' LCMScheduler.

- The guidance embedding and a guidance-distilled UNet (time_cond_proj_dim) against diffusers'
  `get_guidance_scale_embedding` and UNet2DConditionModel(timestep_cond=...): fp32, 1e-4 of the
  output's scale, as test_unet.py.
- Whole images (tolerance as test_pipeline.py: rounding only) for an LCM-LoRA-style model (a plain
  UNet with LCMScheduler, CFG when guidance > 1) through StableDiffusionPipeline, and for an
  LCM-distilled UNet that takes the guidance embedding through LatentConsistencyModelPipeline.
The sampler loop itself is checked against LCMScheduler in test_samplers.py (test_lcm).
"""

import numpy as np
import pytest
import torch
from diffusers import (LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)

import sd
from helpers import (PROMPT, SD15_SCHEDULE, SEED, assert_close_scaled, assert_same_image, picture, save_folder,
                     tiny_sd15_components)
from sd.unet import UNet, guidance_embedding
from sd.weights import unet_config_from_diffusers, unet_from_diffusers

W, H = 64, 48
W_DIM = 32  # time_cond_proj_dim of the tiny distilled UNet (LCM_Dreamshaper_v7: 256)
LCM_SCHEDULE = {**SD15_SCHEDULE, "set_alpha_to_one": True, "original_inference_steps": 50, "timestep_scaling": 10.0}


def run(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **kwargs).images[0]


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """An LCM-LoRA-fused model as published (e.g. Dreamshaper 8 LCM): plain UNet, LCMScheduler."""
    return save_folder(tiny_sd15_components(), LCMScheduler(**LCM_SCHEDULE), tmp_path_factory.mktemp("lcm-lora"))


@pytest.fixture(scope="module")
def distilled_components():
    return tiny_sd15_components(time_cond_proj_dim=W_DIM)


@pytest.fixture(scope="module")
def distilled_folder(distilled_components, tmp_path_factory):
    path = tmp_path_factory.mktemp("lcm-distilled")
    LatentConsistencyModelPipeline(**distilled_components, scheduler=LCMScheduler(**LCM_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return path


# ---------------------------------------------------------------- components

@pytest.mark.parametrize("dim", [32, 256, 33])
def test_guidance_embedding_matches_diffusers(dim):
    w = torch.tensor([0.0, 0.5, 7.5, 14.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(guidance_embedding(w, dim), ref, rtol=0, atol=0)  # same float32 operations


@torch.no_grad()
def test_distilled_unet_matches_diffusers(distilled_components):
    ref = distilled_components["unet"].eval()
    ours = UNet(unet_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(unet_from_diffusers(ref.state_dict()), strict=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    t, w = torch.tensor([999, 259]), torch.tensor([7.5, 0.5])
    w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=W_DIM)
    expected = ref(x, t, context, timestep_cond=w_emb).sample
    assert_close_scaled(ours(x, t, context, w=w), expected, name="distilled UNet")
    # The guidance weight matters: a different w gives a different output.
    assert (ours(x, t, context, w=w + 1) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="w: a guidance-distilled UNet"):
        ours(x, t, context)


# ---------------------------------------------------------------- whole images

@pytest.fixture(scope="module")
def lora(lora_folder):
    return sd.load(lora_folder, device="cpu")


@pytest.mark.parametrize("steps, guidance", [(4, 1.0), (1, 1.0), (8, 1.5), (3, 4.0)])
def test_lcm_lora_model_matches_diffusers(lora, lora_folder, steps, guidance):
    ref = run(StableDiffusionPipeline.from_pretrained(lora_folder, safety_checker=None, requires_safety_checker=False),
              width=W, height=H, num_inference_steps=steps, guidance_scale=guidance)
    ours = lora.generate(PROMPT, width=W, height=H, num_steps=steps, guidance=guidance, seed=SEED)
    assert lora.last_settings["sampler"] == "lcm"
    assert_same_image(ours, ref, f"LCM-LoRA {steps} steps guidance {guidance}")


def test_lcm_img2img_matches_diffusers(lora, lora_folder):
    ref = run(StableDiffusionImg2ImgPipeline.from_pretrained(lora_folder, safety_checker=None,
                                                             requires_safety_checker=False),
              image=picture(), strength=0.5, num_inference_steps=8, guidance_scale=1.0)
    ours = lora.generate(PROMPT, image=picture(), strength=0.5, num_steps=8, guidance=1.0, seed=SEED)
    assert_same_image(ours, ref, "LCM img2img strength 0.5, 4 of 8 steps")


@pytest.mark.parametrize("steps, guidance", [(4, 8.5), (2, 3.0), (6, 1.0)])
def test_distilled_model_matches_diffusers(distilled_folder, steps, guidance):
    ref = run(LatentConsistencyModelPipeline.from_pretrained(distilled_folder, safety_checker=None,
                                                             requires_safety_checker=False),
              width=W, height=H, num_inference_steps=steps, guidance_scale=guidance)
    ours = sd.load(distilled_folder, device="cpu").generate(PROMPT, width=W, height=H, num_steps=steps,
                                                            guidance=guidance, seed=SEED)
    assert_same_image(ours, ref, f"LCM-distilled {steps} steps guidance {guidance}")


def test_lcm_defaults(lora, distilled_folder):
    """The folder's LCMScheduler picks the LCM sampler, 4 steps (diffusers' LCM pipeline), and
    guidance 8.5 for a distilled UNet (the same pipeline's default), 1 (no CFG) for LCM-LoRA models."""
    distilled = sd.load(distilled_folder, device="cpu")
    assert (lora.defaults.sampler, lora.defaults.num_steps, lora.defaults.guidance) == ("lcm", 4, 1.0)
    assert (distilled.defaults.sampler, distilled.defaults.num_steps, distilled.defaults.guidance) == ("lcm", 4, 8.5)


def test_lcm_step_limit_is_a_clear_error(lora):
    with pytest.raises(ValueError, match="num_steps: the LCM sampler takes at most original_inference_steps=50"):
        lora.generate(PROMPT, width=W, height=H, num_steps=51, seed=SEED)
