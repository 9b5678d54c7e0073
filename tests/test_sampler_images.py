"""Whole images from each sampler added with a diffusers twin, against that twin, SD 1.5 and SDXL.

Tiny random-weight models (helpers.tiny_sd15_components, conftest's tiny_sdxl_components), saved
as diffusers folders with the published scheduler configs (SD 1.5: DDIM, "leading", steps_offset 1;
SDXL: Euler, the same spacing), loaded by `sd.load(folder)`; the reference is the diffusers
pipeline reloaded from the same folder, its scheduler swapped for the twin with
`Twin.from_config(pipe.scheduler.config, <the settings that pick the sampler>)`, as users swap
schedulers. The same seed on both sides, CFG with a negative prompt (SD 1.5) or SDXL's zeros.

Tolerance as tests/test_pipeline.py: ours is a uint8 image, the reference diffusers' float image
times 255, so an exact match differs by at most 0.5; max |ours - ref * 255| <= 0.51 (PIXEL_TOL).
Run with `pytest -s` to see the measured differences ("[parity]" lines). The loops themselves are
compared step by step, over every spacing and prediction type, in tests/test_samplers.py.
"""

import json
import os

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

import sd
from helpers import assert_same_image, tiny_sd15_components, twin_from_config

PROMPT, NEGATIVE = "a red circle on a blue square", "blurry, low quality"
STEPS, GUIDANCE, SEED = 6, 6.0, 3

# The published scheduler configs, every value stated (test_pipeline.py / test_sdxl.py).
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
            set_alpha_to_one=False)
SDXL_EXTRAS = dict(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)

# (sampler, its options); an option that is a setting of the twin goes to from_config too.
CASES = [("heun", {}), ("dpm_2", {}), ("dpm_2_ancestral", {}), ("lms", {}), ("ddpm", {}), ("dpmpp_2m_sde", {}),
         ("dpmpp_2m_sde", {"solver_type": "heun"}), ("unipc", {}), ("deis", {})]
# Each model sees both non-square shapes and both kinds of unconditional input.
MODELS = {"sd15": dict(width=64, height=48, negative_prompt=NEGATIVE), "sdxl": dict(width=48, height=64)}


@pytest.fixture(scope="module")
def sd15_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15-samplers")
    StableDiffusionPipeline(**tiny_sd15_components(), scheduler=DDIMScheduler(**SD15), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return sd.load(path, device="cpu"), ref, dict(ref.scheduler.config)


@pytest.fixture(scope="module")
def sdxl_pair(tiny_sdxl_components, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-samplers")
    euler = {k: v for k, v in SD15.items() if k not in ("clip_sample", "set_alpha_to_one")}
    StableDiffusionXLPipeline(**tiny_sdxl_components, scheduler=EulerDiscreteScheduler(**euler),
                              add_watermarker=False).save_pretrained(path)
    # As the published SDXL scheduler_config.json, which states DDIM's and PNDM's options too.
    config_path = path / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **SDXL_EXTRAS}, indent=2))
    ref = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return sd.load(path, device="cpu"), ref, dict(ref.scheduler.config)


# By default each case runs on one model, the models taking turns; SD_SLOW_TESTS=1 runs both.
SLOW = bool(os.environ.get("SD_SLOW_TESTS"))
RUNS = [(model, *case) for k, case in enumerate(CASES) for model in MODELS
        if SLOW or model == list(MODELS)[k % len(MODELS)]]


@pytest.mark.parametrize("model,sampler,options", RUNS,
                         ids=[f"{m}-{s}" + "".join(f"-{k}={v}" for k, v in o.items()) for m, s, o in RUNS])
def test_image_matches_twin(request, model, sampler, options):
    ours, ref, config = request.getfixturevalue(f"{model}_pair")
    kw = MODELS[model]
    ref.scheduler = twin_from_config(sampler, config, **options)
    expected = ref(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
    image = ours.generate(PROMPT, num_steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler=sampler,
                          sampler_options=options, **kw)
    assert ours.last_settings["sampler"] == sampler
    assert_same_image(image, expected, f"{model}/{sampler}{options or ''}")
