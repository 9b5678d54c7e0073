"""Long prompts, weighted style, and clip skip, image for image against diffusers.

Tiny random-weight SD 1.5- and SDXL-shaped pipelines built by diffusers / transformers, saved, and
loaded by both `sd.load(folder)` and diffusers' `from_pretrained(folder)`; fp32 on the CPU, Euler,
the same seed on both sides.

- long prompt, `prompt_style="weighted"` (unweighted text, so compel reads it the same): diffusers
  run with `prompt_embeds` (SDXL: and pooled) built by compel (`truncate_long_prompts=False`,
  negative padded to the same length), the package diffusers' docs point to for long prompts.
- clip skip: SD 1.5's diffusers `clip_skip=` path fails with transformers 5 (it calls
  `text_encoder.text_model.final_layer_norm`), so its prompt embeddings are built here as diffusers'
  encode_prompt does (hidden_states[-(clip_skip + 1)], then the final norm) and passed as
  `prompt_embeds=`; diffusers encodes the negative prompt itself, with no skip. SDXL's own
  `clip_skip=` works and is used as it is.
- plain style (the default) with a prompt over 77 tokens: diffusers' own truncation, and the
  image's settings count the dropped tokens.

Tolerance as tests/test_pipeline.py: max |ours - diffusers * 255| <= 0.51 of a level.
By hand: with the comma backtrack off (COMMA_BACKTRACK = 0) the SD 1.5 long-prompt image misses by
far more (the test below checks it: 44 levels), and with clip skip applied to the negative prompt too
(A1111's way) the clip-skip images differ from diffusers' by 123 (SD 1.5) and 255 (SDXL) levels.
"""

import numpy as np
import pytest
import torch
from compel import CompelForSD, CompelForSDXL
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from transformers import CLIPTextModel as HFCLIPTextModel

import sd
from helpers import NEGATIVE, SD15_LONG, SDXL_LONG, assert_same_image, randomize_params, tiny_sd15_components
from sd import prompts
from sd.tokenizer import ASSETS, Tokenizer

PROMPT = "a red circle on a blue square"
STEPS, GUIDANCE, SEED, W, H = 4, 6.0, 3, 64, 48
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)


def ours(pipe, prompt, **kw):
    return pipe.generate(prompt, width=W, height=H, num_steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler="euler",
                         **kw)


def theirs(ref, **kw) -> np.ndarray:
    return ref(width=W, height=H, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
               generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]


# ---------------------------------------------------------------- SD 1.5

@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15-prompts")
    StableDiffusionPipeline(**tiny_sd15_components(64), scheduler=EulerDiscreteScheduler(**SD15_SCHEDULE),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return sd.load(path, device="cpu"), ref


def sd15_long_reference(ref):
    with torch.no_grad():
        c = CompelForSD(ref)(SD15_LONG, negative_prompt=NEGATIVE)
    return theirs(ref, prompt_embeds=c.embeds, negative_prompt_embeds=c.negative_embeds)


def test_sd15_long_prompt_matches_diffusers_with_compel(sd15):
    pipe, ref = sd15
    img = ours(pipe, SD15_LONG, negative_prompt=NEGATIVE, prompt_style="weighted")
    assert "prompt_tokens_dropped" not in img.info["sd"] and img.info["sd"]["prompt_style"] == "weighted"
    assert_same_image(img, sd15_long_reference(ref), "sd15/long prompt vs compel")


def test_sd15_long_prompt_without_comma_backtrack_misses(sd15, monkeypatch):
    pipe, ref = sd15
    monkeypatch.setattr(prompts, "COMMA_BACKTRACK", 0)
    img = ours(pipe, SD15_LONG, negative_prompt=NEGATIVE, prompt_style="weighted")
    with pytest.raises(AssertionError, match="max pixel difference"):
        assert_same_image(img, sd15_long_reference(ref), "sd15/long prompt, no backtrack (must fail)")


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd15_clip_skip_matches_diffusers(sd15, clip_skip):
    pipe, ref = sd15
    img = ours(pipe, PROMPT, negative_prompt=NEGATIVE, clip_skip=clip_skip)
    ids = ref.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states
        embeds = ref.text_encoder.final_layer_norm(hidden[-(clip_skip + 1)])
    assert_same_image(img, theirs(ref, prompt_embeds=embeds, negative_prompt=NEGATIVE), f"sd15/clip skip {clip_skip}")
    assert img.info["sd"]["clip_skip"] == clip_skip
    unskipped = np.asarray(ours(pipe, PROMPT, negative_prompt=NEGATIVE), dtype=float)
    assert np.abs(np.asarray(img, dtype=float) - unskipped).max() > 5, "clip skip did not change the image"


def test_sd15_plain_long_prompt_is_diffusers_and_counted(sd15):
    pipe, ref = sd15
    img = ours(pipe, SD15_LONG, negative_prompt=NEGATIVE)
    assert img.info["sd"]["prompt_tokens_dropped"] == len(Tokenizer().encode_ids(SD15_LONG)) - 75
    assert_same_image(img, theirs(ref, prompt=SD15_LONG, negative_prompt=NEGATIVE), "sd15/plain long prompt")


# ---------------------------------------------------------------- SDXL

def hf_text_config(layers: int, act: str, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=64, intermediate_size=37, num_attention_heads=1, num_hidden_layers=layers,
                          vocab_size=49408, max_position_embeddings=77, hidden_act=act, **kw)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """SDXL's shape in miniature (as tests/test_sdxl.py): two text encoders side by side (64 + 64 wide),
    bigG's projected pooled output plus six 8-wide size numbers into the UNet's "text_time" embedding."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, scaling_factor=0.13025, force_upcast=True)
    text_encoder = HFCLIPTextModel(hf_text_config(3, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(hf_text_config(4, "gelu", projection_dim=64))
    for seed, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        randomize_params(model, seed=seed)
    path = tmp_path_factory.mktemp("sdxl-prompts")
    StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77, pad_token="!"),
        scheduler=EulerDiscreteScheduler(**SD15_SCHEDULE), add_watermarker=False).save_pretrained(path)
    ref = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return sd.load(path, device="cpu"), ref


def test_sdxl_long_prompt_matches_diffusers_with_compel(sdxl):
    pipe, ref = sdxl
    img = ours(pipe, SDXL_LONG, negative_prompt=NEGATIVE, prompt_style="weighted")
    with torch.no_grad():
        c = CompelForSDXL(ref)(SDXL_LONG, negative_prompt=NEGATIVE)
    expected = theirs(ref, prompt_embeds=c.embeds, pooled_prompt_embeds=c.pooled_embeds,
                      negative_prompt_embeds=c.negative_embeds, negative_pooled_prompt_embeds=c.negative_pooled_embeds)
    assert_same_image(img, expected, "sdxl/long prompt vs compel")


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-neg", "neg"])
def test_sdxl_clip_skip_matches_diffusers(sdxl, negative):
    pipe, ref = sdxl
    img = ours(pipe, PROMPT, negative_prompt=negative, clip_skip=1)
    expected = theirs(ref, prompt=PROMPT, negative_prompt=negative, clip_skip=1)
    assert_same_image(img, expected, f"sdxl/clip skip 1/{'neg' if negative else 'no-neg'}")
    unskipped = np.asarray(ours(pipe, PROMPT, negative_prompt=negative), dtype=float)
    assert np.abs(np.asarray(img, dtype=float) - unskipped).max() > 5, "clip skip did not change the image"
