"""SDXL whole pipelines, image for image, against diffusers' StableDiffusionXLPipeline.

Tiny random-weight SDXL-shaped models (two text encoders, a "text_time" UNet, the 0.13025 VAE),
fp32 on the CPU, the same seed on both sides (ours: `seed=N`; diffusers:
`generator=torch.Generator("cpu").manual_seed(N)`), non-square sizes.

- diffusers layout: a tiny StableDiffusionXLPipeline built by diffusers / transformers, `save_pretrained`,
  loaded by `sd.load(folder)`; the reference is `StableDiffusionXLPipeline.from_pretrained(folder)` with
  `X.from_config(ref.scheduler.config)` per sampler. ddim / euler / euler_a / dpmpp_2m, with and without a
  negative prompt (none: SDXL conditions on zeros), explicit size / crop conditioning.
- single file: our own randomly initialised models written by sd.writer in the official SDXL layout
  (`model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.0.transformer.text_model.*`,
  `conditioner.embedders.1.model.*` in OpenCLIP names) plus junk; the reference is built from that file by
  diffusers' own `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`
  and `convert_open_clip_checkpoint`.
- SDXL-Lightning: a replacement UNet file (`unet=`), Euler on "trailing" timesteps, no CFG, 1/2/4/8 steps,
  the 1-step UNet predicting the sample; defaults read from the file name.
- dtype: float16 loading keeps SDXL's VAE in float32 unless its config says force_upcast false.

Tolerance as tests/test_pipeline.py: ours is a uint8 image, the reference diffusers' float image times 255,
so an exact match differs by at most 0.5; max |ours - ref * 255| <= 0.51.
Run with `pytest -s` to see the measured differences ("[parity]" lines).
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection
from transformers import CLIPTextModel as HFCLIPTextModel

import sd
from helpers import (ADM_IN, BIG_G_KEY, BIG_G_TINY, CLIP_L_TINY, CONTEXT_DIM, SAMPLERS, SDXL_SCHEDULER, TEXT_WIDTH,
                     UNET_KEY, UNET_XL, VAE_XL, XL_GUIDANCE, XL_NEGATIVE, XL_PROMPT, XL_SEED, XL_STEPS,
                     assert_same_image, hf_text_config, randomize_params, tiny_sdxl_unet, tokenizers)
from sd import clip as sd_clip
from sd import unet as sd_unet
from sd.writer import write_safetensors
from sd.schedule import ScheduleConfig
from sd.weights import hf_to_openclip

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
PROMPT, NEGATIVE, STEPS, GUIDANCE, SEED = XL_PROMPT, XL_NEGATIVE, XL_STEPS, XL_GUIDANCE, XL_SEED


# ---------------------------------------------------------------- comparison

def run_reference(pipe, scheduler, *, negative_prompt=None, width, height, steps=STEPS, guidance=GUIDANCE,
                  seed=SEED, **kw) -> np.ndarray:
    pipe.scheduler = scheduler
    out = pipe(PROMPT, negative_prompt=negative_prompt, width=width, height=height, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw)
    return out.images[0]


# ---------------------------------------------------------------- diffusers-layout folder

def load_reference(path, **components) -> StableDiffusionXLPipeline:
    ref = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False, **components)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def folder_pair(sdxl_folder):
    ref = load_reference(sdxl_folder)
    return sd.load(sdxl_folder, device="cpu"), ref, dict(ref.scheduler.config)


def test_folder_reads_sdxl_settings(folder_pair):
    ours, _, config = folder_pair
    assert ours.family == "sdxl" and len(ours.text_encoders) == 2
    assert ours.defaults.sampler == "euler"
    assert ours.unet.cfg.heads == (1, 2) and ours.unet.cfg.context_dim == CONTEXT_DIM
    assert ours.unet.cfg.adm_in_channels == ADM_IN
    assert ours.vae.cfg.scaling_factor == 0.13025
    assert config["clip_sample"] is False and config["set_alpha_to_one"] is False
    assert ours.schedule_config.set_alpha_to_one is False and ours.schedule_config.timestep_spacing == "leading"


# Every sampler sees both non-square shapes.
FOLDER_SIZES = {(None, "ddim"): (64, 48), (NEGATIVE, "ddim"): (48, 64), (None, "euler"): (48, 64),
                (NEGATIVE, "euler"): (64, 48), (None, "euler_a"): (64, 48), (NEGATIVE, "euler_a"): (48, 64),
                (None, "dpmpp_2m"): (48, 64), (NEGATIVE, "dpmpp_2m"): (64, 48)}


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-neg", "neg"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_folder_matches_diffusers(folder_pair, sampler, negative):
    ours, ref, config = folder_pair
    w, h = FOLDER_SIZES[negative, sampler]
    img = ours.generate(PROMPT, negative_prompt=negative, width=w, height=h, num_steps=STEPS, guidance=GUIDANCE,
                        seed=SEED, sampler=sampler)
    expected = run_reference(ref, SAMPLERS[sampler].from_config(config), negative_prompt=negative, width=w, height=h)
    assert_same_image(img, expected, f"xl-folder/{sampler}/{'neg' if negative else 'no-neg'}/{w}x{h}")
    # By default the size conditioning is the image's own size, uncropped (diffusers' default).
    s = ours.last_settings
    assert (s["original_size"], s["crop_top_left"], s["target_size"]) == ((h, w), (0, 0), (h, w))


def test_folder_default_sampler(folder_pair):
    ours, ref, config = folder_pair
    img = ours.generate(PROMPT, width=64, height=48, num_steps=STEPS, guidance=GUIDANCE, seed=SEED)
    assert ours.last_settings["sampler"] == "euler"
    expected = run_reference(ref, EulerDiscreteScheduler.from_config(config), width=64, height=48)
    assert_same_image(img, expected, "xl-folder/default(euler)/64x48")


def test_folder_negative_prompt_matters(folder_pair):
    """A negative prompt replaces SDXL's zero unconditional embedding: the image changes, so the
    with / without negative prompt cases compare different images."""
    ours = folder_pair[0]
    kw = dict(width=64, height=48, num_steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler="euler")
    a = np.asarray(ours.generate(PROMPT, **kw), dtype=float)
    b = np.asarray(ours.generate(PROMPT, negative_prompt=NEGATIVE, **kw), dtype=float)
    assert np.abs(a - b).max() > 5


SIZES = dict(original_size=(96, 80), crop_top_left=(8, 4), target_size=(64, 40))


def test_folder_size_conditioning_matches_diffusers(folder_pair):
    ours, ref, config = folder_pair
    kw = dict(width=48, height=64, num_steps=STEPS, guidance=GUIDANCE, seed=1, sampler="euler")
    img = ours.generate(PROMPT, negative_prompt=NEGATIVE, **kw, **SIZES)
    assert {k: tuple(ours.last_settings[k]) for k in SIZES} == SIZES
    expected = run_reference(ref, EulerDiscreteScheduler.from_config(config), negative_prompt=NEGATIVE,
                             width=48, height=64, seed=1, original_size=SIZES["original_size"],
                             crops_coords_top_left=SIZES["crop_top_left"], target_size=SIZES["target_size"])
    assert_same_image(img, expected, "xl-folder/euler/size-conditioning/48x64")
    # ... and the conditioning reaches the UNet: the default (64x48 image, no crop) gives another image.
    default = ours.generate(PROMPT, negative_prompt=NEGATIVE, **kw)
    assert ours.last_settings["original_size"] == (64, 48) and ours.last_settings["crop_top_left"] == (0, 0)
    assert np.abs(np.asarray(img, dtype=float) - np.asarray(default, dtype=float)).max() > 5
    # Each of the three pairs matters on its own.
    for name, value in SIZES.items():
        one = ours.generate(PROMPT, negative_prompt=NEGATIVE, **kw, **{name: value})
        assert np.abs(np.asarray(one, dtype=float) - np.asarray(default, dtype=float)).max() > 1, name


@pytest.mark.parametrize("field, value", [("original_size", (64,)), ("crop_top_left", (-1, 0)),
                                          ("target_size", (64.0, 48))])
def test_size_conditioning_validation(folder_pair, field, value):
    with pytest.raises(ValueError, match=field):
        folder_pair[0].generate(PROMPT, width=64, height=48, num_steps=1, **{field: value})


# ---------------------------------------------------------------- single file (official SDXL layout)
# The file is conftest's sdxl_single_file: helpers' UNET_XL, VAE_XL, CLIP_L_TINY and BIG_G_TINY, random.

def test_hf_to_openclip_names_match_the_published_keys():
    """Our conversion writes exactly SDXL's OpenCLIP key set (full-size names, checked on the meta device)."""
    with torch.device("meta"):
        big_g = sd_clip.CLIPTextModel(sd_clip.CLIP_BIG_G)
    ours = {BIG_G_KEY + k: tuple(v.shape) for k, v in hf_to_openclip(big_g.state_dict()).items()}
    published = {}
    for line in (KEYS / "ldm_openclip_bigG.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        published[name] = tuple(json.loads(shape))
    assert ours == published


def reference_from_single_file(path) -> StableDiffusionXLPipeline:
    """The file's tensors through diffusers' own LDM converters into diffusers / transformers models,
    each loaded strict. None of the converters hard-codes a full-size shape on this path:
    convert_open_clip_checkpoint splits q/k/v at `text_projection.shape[0]` (the width) when the file
    has a text_projection, and takes every layer present."""
    checkpoint = load_file(str(path))
    unet = tiny_sdxl_unet(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), strict=True)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32, scaling_factor=0.13025,
                        force_upcast=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)), strict=True)
    text_encoder = HFCLIPTextModel(hf_text_config("quick_gelu"))
    clip_l = convert_ldm_clip_checkpoint(checkpoint)  # strips SDXL's conditioner.embedders.0.transformer.
    # transformers regenerates position_ids (a non-persistent buffer) and names keys without `text_model.`.
    clip_l = {k.removeprefix("text_model."): v for k, v in clip_l.items() if not k.endswith("position_ids")}
    text_encoder.load_state_dict(clip_l, strict=True)
    text_encoder_2 = CLIPTextModelWithProjection(hf_text_config("gelu", projection_dim=TEXT_WIDTH))
    big_g = convert_open_clip_checkpoint(text_encoder_2, checkpoint, prefix=BIG_G_KEY)
    text_encoder_2.load_state_dict(big_g, strict=True)
    tok, tok2 = tokenizers()
    # sd's single-file default: SDXL's published schedule, Euler.
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tok2, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def single_file_pair(sdxl_single_file):
    return sd.load(sdxl_single_file, device="cpu"), reference_from_single_file(sdxl_single_file)


def test_single_file_configs_and_junk(sdxl_single_file, single_file_pair):
    ours = single_file_pair[0]
    assert ours.family == "sdxl"
    assert ours.unet.cfg == UNET_XL and ours.vae.cfg == VAE_XL
    assert [e.cfg for e in ours.text_encoders] == [CLIP_L_TINY, BIG_G_TINY]
    assert ours.defaults.sampler == "euler" and ours.schedule_config == ScheduleConfig()
    assert ours.sample_size == 1024
    # text_projection arrives transposed back into a Linear weight.
    stored = load_file(str(sdxl_single_file))[BIG_G_KEY + "text_projection"]
    assert torch.equal(ours.text_encoders[1].text_projection.weight, stored.T)


SINGLE_FILE_SIZES = {None: (40, 56), NEGATIVE: (56, 40)}


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-neg", "neg"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_single_file_matches_diffusers(single_file_pair, sampler, negative):
    ours, ref = single_file_pair
    w, h = SINGLE_FILE_SIZES[negative]
    img = ours.generate(PROMPT, negative_prompt=negative, width=w, height=h, num_steps=STEPS, guidance=GUIDANCE,
                        seed=SEED, sampler=sampler)
    expected = run_reference(ref, SAMPLERS[sampler].from_config(SDXL_SCHEDULER), negative_prompt=negative,
                             width=w, height=h)
    assert_same_image(img, expected, f"xl-single-file/{sampler}/{'neg' if negative else 'no-neg'}/{w}x{h}")


def test_single_file_default_sampler_and_sizes(single_file_pair):
    ours, ref = single_file_pair
    img = ours.generate(PROMPT, width=64, height=40, num_steps=STEPS, guidance=GUIDANCE, seed=SEED, **SIZES)
    assert ours.last_settings["sampler"] == "euler"
    expected = run_reference(ref, EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), width=64, height=40,
                             original_size=SIZES["original_size"], crops_coords_top_left=SIZES["crop_top_left"],
                             target_size=SIZES["target_size"])
    assert_same_image(img, expected, "xl-single-file/default(euler)/size-conditioning/64x40")


# ---------------------------------------------------------------- SDXL-Lightning (replacement UNet)

LIGHTNING_STEPS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    """A second random UNet of the folder's config, saved in diffusers names as ByteDance ships
    `sdxl_lightning_{N}step_unet.safetensors` (the same weights under each N: only the name differs)."""
    unet = randomize_params(tiny_sdxl_unet(), seed=7)
    path = tmp_path_factory.mktemp("lightning")
    files = {}
    for n in LIGHTNING_STEPS:
        files[n] = path / f"sdxl_lightning_{n}step_unet.safetensors"
        write_safetensors(files[n], unet.state_dict())
    files["unnamed"] = path / "distilled_unet.safetensors"
    shutil.copyfile(files[4], files["unnamed"])
    return unet, files


@pytest.fixture(scope="module")
def lightning_ref(sdxl_folder, lightning):
    ref = load_reference(sdxl_folder, unet=lightning[0])
    # The folder's own scheduler settings, kept: each case swaps `ref.scheduler` (prediction_type="sample" for 1 step).
    return ref, dict(ref.scheduler.config)


def lightning_scheduler(config, steps: int):
    extra = {"prediction_type": "sample"} if steps == 1 else {}
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing", **extra)


def lightning_reference(ref, config, steps, **kw) -> np.ndarray:
    return run_reference(ref, lightning_scheduler(config, steps), width=64, height=48, steps=steps,
                         guidance=0.0, **kw)


def assert_lightning_defaults(ours, steps: int):
    assert ours.defaults.sampler == "euler" and ours.defaults.num_steps == steps and ours.defaults.guidance == 0
    assert ours.schedule_config.timestep_spacing == "trailing"
    assert ours.schedule_config.prediction_type == ("sample" if steps == 1 else "epsilon")
    s = ours.last_settings
    assert (s["sampler"], s["num_steps"], s["guidance"]) == ("euler", steps, 0.0)


@pytest.mark.parametrize("steps", LIGHTNING_STEPS)
def test_lightning_matches_diffusers(sdxl_folder, lightning, lightning_ref, steps):
    """Defaults from the file name: Euler, trailing, N steps, no CFG; 1 step predicts the sample."""
    ours = sd.load(sdxl_folder, unet=lightning[1][steps], device="cpu")
    # No steps / guidance / sampler: the defaults are under test.
    img = ours.generate(PROMPT, negative_prompt=NEGATIVE, width=64, height=48, seed=SEED)
    assert_lightning_defaults(ours, steps)
    expected = lightning_reference(*lightning_ref, steps)  # guidance 0: the negative prompt is unused
    assert_same_image(img, expected, f"xl-lightning/{steps}step")


def test_lightning_trailing_timesteps(lightning_ref):
    """DESIGN.md: "trailing" spacing visits [999, 749, 499, 249] in 4 steps (the reference side of the test)."""
    s = lightning_scheduler(lightning_ref[1], 4)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 749, 499, 249]


def test_lightning_steps_argument(sdxl_folder, lightning, lightning_ref):
    """A file whose name does not say its step count: `lightning_steps=` does."""
    ours = sd.load(sdxl_folder, unet=lightning[1]["unnamed"], device="cpu", lightning_steps=4)
    img = ours.generate(PROMPT, width=64, height=48, seed=SEED)
    assert_lightning_defaults(ours, 4)
    assert_same_image(img, lightning_reference(*lightning_ref, 4), "xl-lightning/unnamed+lightning_steps=4")


def test_replacement_unet_without_lightning_keeps_folder_defaults(sdxl_folder, lightning, lightning_ref):
    """No step count in the name and none given: a plain UNet swap, the folder's schedule and CFG."""
    ours = sd.load(sdxl_folder, unet=lightning[1]["unnamed"], device="cpu")
    assert ours.schedule_config.timestep_spacing == "leading" and ours.defaults.guidance > 1
    img = ours.generate(PROMPT, width=64, height=48, num_steps=STEPS, guidance=GUIDANCE, seed=SEED)
    ref, config = lightning_ref
    expected = run_reference(ref, EulerDiscreteScheduler.from_config(config), width=64, height=48)
    assert_same_image(img, expected, "xl-lightning/unnamed-plain-swap/euler")


@pytest.fixture(scope="module")
def ldm_named_unet(tmp_path_factory):
    """A UNet-only file in the official (LDM) names, from our own random UNet of the folder's shape; its
    reference is the same tensors through diffusers' convert_ldm_unet_checkpoint (not through sd)."""
    cfg = replace(UNET_XL, transformer_depth=(0, 2))  # attention on the second level only
    unet = randomize_params(sd_unet.UNet(cfg), seed=30)
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    ref_unet = tiny_sdxl_unet()
    ref_unet.load_state_dict(convert_ldm_unet_checkpoint({UNET_KEY + k: v for k, v in state.items()},
                                                         dict(ref_unet.config)), strict=True)
    path = tmp_path_factory.mktemp("lightning-ldm")
    files = {"prefixed": path / "sdxl_lightning_4step_unet_ldm.safetensors",
             "bare": path / "sdxl_lightning_4step_unet_bare.safetensors"}
    write_safetensors(files["prefixed"], {UNET_KEY + k: v for k, v in state.items()})
    write_safetensors(files["bare"], state)
    return ref_unet, files


@pytest.mark.parametrize("naming", ["prefixed", "bare"])
def test_lightning_unet_in_single_file_names(sdxl_folder, ldm_named_unet, naming):
    ref_unet, files = ldm_named_unet
    ours = sd.load(sdxl_folder, unet=files[naming], device="cpu")
    img = ours.generate(PROMPT, width=64, height=48, seed=SEED)
    assert_lightning_defaults(ours, 4)
    ref = load_reference(sdxl_folder, unet=ref_unet)
    expected = lightning_reference(ref, dict(ref.scheduler.config), 4)
    assert_same_image(img, expected, f"xl-lightning/ldm-names-{naming}/4step")


def test_lightning_on_single_file_source(sdxl_single_file, single_file_pair, lightning):
    """`unet=` replaces a single file's UNet too (its own is not read)."""
    ours = sd.load(sdxl_single_file, unet=lightning[1][2], device="cpu")
    img = ours.generate(PROMPT, width=64, height=48, seed=SEED)
    assert_lightning_defaults(ours, 2)
    base = single_file_pair[1]
    ref = StableDiffusionXLPipeline(**{**base.components, "unet": lightning[0]})
    ref.set_progress_bar_config(disable=True)
    assert_same_image(img, lightning_reference(ref, SDXL_SCHEDULER, 2), "xl-lightning/single-file-source/2step")


def test_lightning_all_in_one_single_file(sdxl_single_file, single_file_pair, tmp_path):
    """ByteDance's all-in-one `sdxl_lightning_Nstep.safetensors` is an official-layout single file:
    its name alone switches on the Lightning defaults."""
    path = tmp_path / "sdxl_lightning_2step.safetensors"
    shutil.copy(sdxl_single_file, path)
    ours = sd.load(path, device="cpu")
    img = ours.generate(PROMPT, width=64, height=48, seed=SEED)
    assert_lightning_defaults(ours, 2)
    ref = single_file_pair[1]
    assert_same_image(img, lightning_reference(ref, SDXL_SCHEDULER, 2), "xl-lightning/all-in-one/2step")


@pytest.fixture(scope="module")
def sd15_unet_file(tmp_path_factory):
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)
    path = tmp_path_factory.mktemp("sd15-unet") / "sd15_unet.safetensors"
    write_safetensors(path, unet.state_dict())
    return path


@pytest.mark.parametrize("source", ["sdxl_folder", "sdxl_single_file"], ids=["folder", "single_file"])
def test_sd15_unet_does_not_fit_sdxl(request, sd15_unet_file, source):
    with pytest.raises(sd.CheckpointError, match="unet"):
        sd.load(request.getfixturevalue(source), unet=sd15_unet_file, device="cpu")


# ---------------------------------------------------------------- dtype

def dtypes(module) -> set:
    return {p.dtype for p in module.parameters()}


def test_float16_keeps_sdxl_vae_float32(sdxl_folder):
    """SDXL's VAE overflows in float16 (force_upcast in its config): it stays float32."""
    ours = sd.load(sdxl_folder, device="cpu", dtype=torch.float16)
    assert ours.dtype == torch.float16 and ours.vae_dtype == torch.float32
    assert dtypes(ours.unet) == {torch.float16}
    assert all(dtypes(e) == {torch.float16} for e in ours.text_encoders)
    assert dtypes(ours.vae) == {torch.float32}


def test_float16_generation_close_to_float32(sdxl_folder, folder_pair):
    """Smoke test of the mixed path (float16 UNet and text encoders, float32 VAE decode) on the CPU: the
    image is finite and within float16 rounding of the float32 one (not a parity test)."""
    ours16 = sd.load(sdxl_folder, device="cpu", dtype=torch.float16)
    kw = dict(negative_prompt=NEGATIVE, width=64, height=48, num_steps=2, guidance=GUIDANCE, seed=SEED)
    a = np.asarray(ours16.generate(PROMPT, **kw), dtype=float)
    b = np.asarray(folder_pair[0].generate(PROMPT, **kw), dtype=float)
    print(f"[fp16] max |fp16 - fp32| = {np.abs(a - b).max():.1f}, mean {np.abs(a - b).mean():.3f}")
    assert b.std() > 10 and np.abs(a - b).mean() < 1 and np.abs(a - b).max() <= 12


def test_float16_vae_when_force_upcast_false(sdxl_folder, tmp_path):
    """An fp16-safe VAE (force_upcast false, as madebyollin/sdxl-vae-fp16-fix) runs in float16."""
    path = shutil.copytree(sdxl_folder, tmp_path / "fp16-fix")
    cfg_path = path / "vae" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "force_upcast": False}))
    ours = sd.load(path, device="cpu", dtype=torch.float16)
    assert ours.vae_dtype == torch.float16 and dtypes(ours.vae) == {torch.float16}
    assert dtypes(ours.unet) == {torch.float16}


def test_float16_single_file_vae_float32(sdxl_single_file):
    ours = sd.load(sdxl_single_file, device="cpu", dtype="fp16")
    assert ours.vae_dtype == torch.float32 and dtypes(ours.vae) == {torch.float32}
    assert dtypes(ours.unet) == {torch.float16}
