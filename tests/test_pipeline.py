"""Whole pipelines, image for image, against diffusers' StableDiffusionPipeline.

Tiny random-weight SD 1.5-shaped models, fp32 on the CPU, the same seed on both sides
(ours: `seed=N`; diffusers: `generator=torch.Generator("cpu").manual_seed(N)`), non-square sizes,
6 steps, for each of ddim / euler / euler_a / dpmpp_2m, with and without a negative prompt.

Two ways in:
- diffusers layout: a tiny StableDiffusionPipeline built by diffusers / transformers, `save_pretrained`,
  loaded by `sd.load(folder)`; the reference is `StableDiffusionPipeline.from_pretrained(folder)` with
  `X.from_config(ref.scheduler.config)` for the sampler, so both sides read the same saved settings.
- single file: our own randomly initialised models written to one official-layout .safetensors file by
  sd.writer, with the junk real files carry (conftest.py); the reference is built from that file through
  diffusers' own `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` / `convert_ldm_clip_checkpoint`.

Tolerance: ours is a uint8 image (rounded), the reference is diffusers' float image (`output_type="np"`)
times 255, so an exact match differs by at most 0.5; we allow max |ours - ref * 255| <= 0.51, i.e. no
pixel may round to a different value except where the float sits on a .5 boundary within 0.01.
Run with `pytest -s` to see the measured differences ("[parity]" lines).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTokenizer
from transformers import CLIPTextModel as HFCLIPTextModel

import sd
from helpers import (CLIP_TINY, GUIDANCE, NEGATIVE, PROMPT, SAMPLERS, SD15_SCHEDULE, SEED, STEPS, TEXT_WIDTH,
                     UNET_KEY, UNET_TINY, VAE_TINY, assert_same_image, save_folder, tiny_sd15_components)
from sd import clip as sd_clip
from sd.schedule import ScheduleConfig
from sd.tokenizer import ASSETS


# ---------------------------------------------------------------- comparison

def reference(pipe: StableDiffusionPipeline, base_config, sampler: str, *, negative_prompt=None, width, height,
              guidance=GUIDANCE, seed=SEED, steps=STEPS) -> np.ndarray:
    pipe.scheduler = SAMPLERS[sampler].from_config(base_config)
    out = pipe(PROMPT, negative_prompt=negative_prompt, width=width, height=height, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return out.images[0]


def load_reference(folder) -> tuple[StableDiffusionPipeline, dict]:
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, ref.scheduler.config


# ---------------------------------------------------------------- diffusers-layout folders

@pytest.fixture(scope="module")
def diffusers_models():
    return tiny_sd15_components(TEXT_WIDTH)


@pytest.fixture(scope="module")
def folder(diffusers_models, tmp_path_factory):
    """SD 1.5's own layout: DDIMScheduler, "leading" spacing, steps_offset 1."""
    return save_folder(diffusers_models, DDIMScheduler(**SD15_SCHEDULE), tmp_path_factory.mktemp("sd15-ddim"))


@pytest.fixture(scope="module")
def folder_pair(folder):
    ours = sd.load(folder, device="cpu")
    return ours, *load_reference(folder)


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-neg", "neg"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_folder_matches_diffusers(folder_pair, sampler, negative):
    ours, ref, config = folder_pair
    w, h = 64, 48
    img = ours.generate(PROMPT, negative_prompt=negative, width=w, height=h, num_steps=STEPS, guidance=GUIDANCE,
                        seed=SEED, sampler=sampler)
    expected = reference(ref, config, sampler, negative_prompt=negative, width=w, height=h)
    assert_same_image(img, expected, f"folder/{sampler}/{'neg' if negative else 'no-neg'}")


def test_folder_negative_prompt_matters(folder_pair):
    """The negative prompt reaches the UNet: the image changes when it is given, so the with / without
    negative prompt parity cases compare two different images."""
    ours, _, _ = folder_pair
    kw = dict(width=64, height=48, num_steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler="euler")
    a = np.asarray(ours.generate(PROMPT, **kw), dtype=float)
    b = np.asarray(ours.generate(PROMPT, negative_prompt=NEGATIVE, **kw), dtype=float)
    assert np.abs(a - b).max() > 5


def test_no_guidance_matches_diffusers(folder_pair):
    """guidance <= 1: no CFG (one UNet pass per step on the prompt alone; the negative prompt is unused)."""
    ours, ref, config = folder_pair
    img = ours.generate(PROMPT, negative_prompt=NEGATIVE, width=48, height=64, num_steps=STEPS, guidance=1.0,
                        seed=SEED, sampler="euler_a")
    expected = reference(ref, config, "euler_a", negative_prompt=NEGATIVE, width=48, height=64, guidance=1.0)
    assert_same_image(img, expected, "folder/euler_a/guidance-1")


# A folder's scheduler picks the default sampler and its schedule.
EULER_LIKE = {k: v for k, v in SD15_SCHEDULE.items() if k not in ("clip_sample", "set_alpha_to_one")}
DEFAULT_SAMPLER_CASES = {
    # Euler ancestral with "linspace" spacing (fractional timesteps, initial noise at sigma_max).
    "EulerAncestral-linspace": (EulerAncestralDiscreteScheduler, {**EULER_LIKE, "timestep_spacing": "linspace"},
                                "euler_a"),
    # DPM-Solver++(2M) with "trailing" spacing.
    "DPMSolverMultistep-trailing": (DPMSolverMultistepScheduler, {**EULER_LIKE, "timestep_spacing": "trailing"},
                                    "dpmpp_2m"),
    # SD 1.5's published scheduler_config.json: PNDM with skip_prk_steps, i.e. PLMS.
    "PNDM-sd15": (PNDMScheduler, {**EULER_LIKE, "skip_prk_steps": True, "set_alpha_to_one": False}, "plms"),
}


@pytest.mark.parametrize("case", list(DEFAULT_SAMPLER_CASES))
def test_default_sampler_from_folder(diffusers_models, tmp_path_factory, case):
    cls, config, expected_sampler = DEFAULT_SAMPLER_CASES[case]
    if expected_sampler not in sd.SAMPLERS:
        pytest.skip(f"sd has no {expected_sampler!r} sampler")
    path = save_folder(diffusers_models, cls(**config), tmp_path_factory.mktemp(case))
    ours = sd.load(path, device="cpu")
    assert ours.defaults.sampler == expected_sampler
    ref, _ = load_reference(path)
    assert type(ref.scheduler) is cls and ref.scheduler.config.timestep_spacing == config["timestep_spacing"]
    img = ours.generate(PROMPT, negative_prompt=NEGATIVE, width=64, height=48, num_steps=STEPS, guidance=GUIDANCE,
                        seed=SEED)  # sampler=None: the folder's
    assert ours.last_settings["sampler"] == expected_sampler
    expected = ref(PROMPT, negative_prompt=NEGATIVE, width=64, height=48, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED),
                   output_type="np").images[0]
    assert_same_image(img, expected, f"folder-default/{case}")


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_with_non_leading_spacing(diffusers_models, tmp_path_factory, spacing):
    path = save_folder(diffusers_models, DDIMScheduler(**{**SD15_SCHEDULE, "timestep_spacing": spacing}),
                       tmp_path_factory.mktemp(f"ddim-{spacing}"))
    ours = sd.load(path, device="cpu")
    ref, config = load_reference(path)
    img = ours.generate(PROMPT, width=64, height=48, num_steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler="ddim")
    expected = reference(ref, config, "ddim", width=64, height=48)
    assert_same_image(img, expected, f"folder-ddim/{spacing}")


@pytest.fixture(scope="module")
def vpred_pair(diffusers_models, tmp_path_factory):
    """SD 2.x-style v-prediction schedule (DDIMScheduler, prediction_type="v_prediction")."""
    cfg = {**SD15_SCHEDULE, "prediction_type": "v_prediction"}
    path = save_folder(diffusers_models, DDIMScheduler(**cfg), tmp_path_factory.mktemp("v-prediction"))
    assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    return sd.load(path, device="cpu"), *load_reference(path)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_v_prediction_matches_diffusers(vpred_pair, sampler):
    ours, ref, config = vpred_pair
    img = ours.generate(PROMPT, negative_prompt=NEGATIVE, width=64, height=48, num_steps=STEPS, guidance=GUIDANCE,
                        seed=SEED, sampler=sampler)
    expected = reference(ref, config, sampler, negative_prompt=NEGATIVE, width=64, height=48)
    assert_same_image(img, expected, f"folder-vpred/{sampler}")


# ---------------------------------------------------------------- single file (official layout)
# The file is conftest's sd15_single_file: helpers' UNET_TINY, VAE_TINY and CLIP_TINY_CFG, random.

def reference_from_single_file(path) -> tuple[StableDiffusionPipeline, dict]:
    """The file's tensors through diffusers' own LDM converters into diffusers / transformers models."""
    checkpoint = load_file(str(path))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32, use_linear_projection=False)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), strict=True)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32, scaling_factor=0.18215)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)), strict=True)
    text_encoder = HFCLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_WIDTH, intermediate_size=CLIP_TINY["mlp_width"], num_attention_heads=TEXT_WIDTH // 64,
        num_hidden_layers=CLIP_TINY["layers"], vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"))
    clip = convert_ldm_clip_checkpoint(checkpoint)
    # transformers regenerates position_ids (a non-persistent buffer) and names keys without `text_model.`.
    clip = {k.removeprefix("text_model."): v for k, v in clip.items() if not k.endswith("position_ids")}
    text_encoder.load_state_dict(clip, strict=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config


@pytest.fixture(scope="module")
def single_file_pair(sd15_single_file):
    ours = sd.load(sd15_single_file, device="cpu")
    return ours, *reference_from_single_file(sd15_single_file)


def test_single_file_skips_junk_and_infers_configs(sd15_single_file, single_file_pair):
    """Configs come from shapes plus SD 1.5's family rules; position_ids, the schedule tensors and the
    model_ema.* copies are skipped (the live UNet weight is loaded, not its EMA copy)."""
    ours = single_file_pair[0]
    assert ours.unet.cfg == UNET_TINY and ours.vae.cfg == VAE_TINY
    assert ours.text_encoders[0].cfg == sd_clip.CLIPConfig(**CLIP_TINY)
    assert ours.defaults.sampler == "euler"
    assert ours.schedule_config == ScheduleConfig()  # SD 1.5's settings
    live = load_file(str(sd15_single_file))[UNET_KEY + "input_blocks.0.0.weight"]
    assert torch.equal(ours.unet.state_dict()["input_blocks.0.0.weight"], live)


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-neg", "neg"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_single_file_matches_diffusers(single_file_pair, sampler, negative):
    ours, ref, config = single_file_pair
    w, h = 40, 56
    img = ours.generate(PROMPT, negative_prompt=negative, width=w, height=h, num_steps=STEPS, guidance=GUIDANCE,
                        seed=SEED, sampler=sampler)
    expected = reference(ref, config, sampler, negative_prompt=negative, width=w, height=h)
    assert_same_image(img, expected, f"single-file/{sampler}/{'neg' if negative else 'no-neg'}")


def test_single_file_default_sampler_matches_diffusers_euler(single_file_pair):
    ours, ref, config = single_file_pair
    img = ours.generate(PROMPT, width=64, height=40, num_steps=STEPS, guidance=GUIDANCE, seed=SEED)
    assert ours.last_settings["sampler"] == "euler"
    expected = reference(ref, config, "euler", width=64, height=40)
    assert_same_image(img, expected, "single-file/default(euler)/64x40")


# ---------------------------------------------------------------- input validation and seeds

@pytest.mark.parametrize("field, value", [("width", 60), ("height", 50), ("width", 0), ("height", -8)])
def test_size_must_be_multiple_of_8(folder_pair, field, value):
    kw = dict(width=64, height=48, num_steps=1)
    kw[field] = value
    with pytest.raises(ValueError, match=rf"{field}.*multiple of 8"):
        folder_pair[0].generate(PROMPT, **kw)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_num_steps_must_be_positive_integer(folder_pair, steps):
    with pytest.raises(ValueError, match="num_steps"):
        folder_pair[0].generate(PROMPT, width=64, height=48, num_steps=steps)


def test_unknown_sampler(folder_pair):
    with pytest.raises(ValueError, match=r"sampler.*'heun_magic'"):
        folder_pair[0].generate(PROMPT, width=64, height=48, num_steps=1, sampler="heun_magic")


@pytest.mark.parametrize("prompt", [None, 42, [], ["a cat", 3], b"a cat"])
def test_prompt_must_be_string(folder_pair, prompt):
    """A string, or a non-empty list of strings (a batch)."""
    with pytest.raises(ValueError, match="prompt"):
        folder_pair[0].generate(prompt, width=64, height=48, num_steps=1)


def test_negative_prompt_must_be_string(folder_pair):
    with pytest.raises(ValueError, match="negative_prompt"):
        folder_pair[0].generate(PROMPT, negative_prompt=7, width=64, height=48, num_steps=1)


def test_seeds(folder_pair):
    ours = folder_pair[0]
    kw = dict(width=64, height=48, num_steps=2, guidance=GUIDANCE, sampler="euler_a")
    a = np.asarray(ours.generate(PROMPT, seed=5, **kw))
    b = np.asarray(ours.generate(PROMPT, seed=5, **kw))
    c = np.asarray(ours.generate(PROMPT, seed=6, **kw))
    assert np.array_equal(a, b), "same seed, different image"
    assert np.abs(a.astype(int) - c).max() > 5, "different seeds, same image"

    d = np.asarray(ours.generate(PROMPT, seed=None, **kw))
    chosen = ours.last_settings["seed"]
    assert isinstance(chosen, int) and 0 <= chosen < 2 ** 64
    e = np.asarray(ours.generate(PROMPT, seed=chosen, **kw))
    assert np.array_equal(d, e), "regenerating with last_settings['seed'] gives another image"
