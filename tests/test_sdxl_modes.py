"""SDXL image to image and inpainting (plain 4-channel UNet), image for image, against diffusers'
StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline.

The tiny random-weight SDXL folder test_sdxl.py uses (conftest's sdxl_folder: two text encoders, a
"text_time" UNet with 4 input channels, the 0.13025 VAE with a latent scale of 2), fp32 on the CPU, loaded
by `sd.load(folder)`; the references are `StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)` and
`StableDiffusionXLInpaintPipeline.from_pretrained(folder)` (`requires_aesthetics_score` False, so the size
conditioning is txt2img's six numbers) with `X.from_config(<the folder's full scheduler config>)` per sampler.
The same seed on both sides (ours: `seed=N`; diffusers: `generator=torch.Generator("cpu").manual_seed(N)`);
an input picture of random colours at 64x48 (non-square) and a rectangular mask.

- img2img: ddim / euler / euler_a / dpmpp_2m at strength 0.6 (3 of 5 steps), and euler at 1.0 (all 5) and
  0.2 (exactly one step); the working size is the picture's own (diffusers' img2img takes no size).
  Covers the draw order (posterior sample of the image latents, then the noise) and the noising of the image
  latents to the first kept timestep.
- inpainting, 4-channel UNet: euler and dpmpp_2m at strength 1.0 (start from pure noise) and 0.5, euler_a
  at 0.5 (its per-step noise draws follow the image latents, noise and masked-image latents draws). Covers
  diffusers' re-noising of the known region after every step and the clean latents after the last.
- `keep_unmasked=True`: outside the mask (black) the output's pixels are the input's exactly.
- Each case also checks the number of denoising steps run on both sides: int(num_steps * strength).

Tolerance as tests/test_pipeline.py: ours is a uint8 image, the reference diffusers' float image
(`output_type="np"`) times 255, so an exact match differs by at most 0.5; max |ours - ref * 255| <= 0.51.
Run with `pytest -s` to see the measured differences ("[parity]" lines).
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image

import sd
from helpers import SAMPLERS, XL_GUIDANCE, XL_NEGATIVE, XL_PROMPT, XL_SEED, assert_same_image

PROMPT, NEGATIVE, GUIDANCE, SEED = XL_PROMPT, XL_NEGATIVE, XL_GUIDANCE, XL_SEED

STEPS = 5
WIDTH, HEIGHT = 64, 48
# The repainted rectangle (white in the mask): left, top, right, bottom in pixels, on the latent grid (2 px).
BOX = (16, 12, 48, 36)


def picture() -> Image.Image:
    """Random colours with some structure: a random 8x6 image blown up, plus per-pixel noise."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT),
                                                                                      Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-40, 41, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def mask() -> Image.Image:
    array = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    left, top, right, bottom = BOX
    array[top:bottom, left:right] = 255
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def pipes(sdxl_folder):
    ours = sd.load(sdxl_folder, device="cpu")
    img2img = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    for ref in (img2img, inpaint):
        ref.set_progress_bar_config(disable=True)
        # Size conditioning as txt2img: (original, crop, target), no aesthetic scores.
        assert ref.config.requires_aesthetics_score is False
    assert inpaint.unet.config.in_channels == 4
    # The folder's scheduler settings, every field stated (see the `sdxl_folder` fixture in conftest.py).
    config = dict(img2img.scheduler.config)
    assert config["clip_sample"] is False and config["set_alpha_to_one"] is False
    return ours, img2img, inpaint, config


def generate(ours, sampler, strength, **kw):
    steps = []
    img = ours.generate(PROMPT, negative_prompt=NEGATIVE, num_steps=STEPS, guidance=GUIDANCE, seed=SEED,
                        sampler=sampler, image=picture(), strength=strength,
                        callback=lambda step: steps.append(step.i + 1), **kw)
    assert steps == list(range(1, int(STEPS * strength) + 1)), steps
    return img


def reference(ref, config, sampler, strength, **kw) -> np.ndarray:
    ref.scheduler = SAMPLERS[sampler].from_config(config)
    steps = []

    def count(pipe, i, t, tensors):
        steps.append(int(t))
        return tensors

    out = ref(PROMPT, negative_prompt=NEGATIVE, image=picture(), strength=strength, num_inference_steps=STEPS,
              guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
              callback_on_step_end=count, **kw)
    assert len(steps) == int(STEPS * strength), steps
    return out.images[0]


# ---------------------------------------------------------------- img2img

IMG2IMG_CASES = [(s, 0.6) for s in SAMPLERS] + [("euler", 1.0), ("euler", 0.2)]


@pytest.mark.parametrize("sampler, strength", IMG2IMG_CASES, ids=[f"{s}-{v}" for s, v in IMG2IMG_CASES])
def test_img2img_matches_diffusers(pipes, sampler, strength):
    ours, ref, _, config = pipes
    img = generate(ours, sampler, strength)  # no width / height: the picture's own size
    s = ours.last_settings
    assert (s["width"], s["height"], s["strength"]) == (WIDTH, HEIGHT, strength)
    assert (s["original_size"], s["crop_top_left"], s["target_size"]) == ((HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH))
    expected = reference(ref, config, sampler, strength)
    assert_same_image(img, expected, f"xl-img2img/{sampler}/strength={strength}/{WIDTH}x{HEIGHT}")


# ---------------------------------------------------------------- inpainting, 4-channel UNet

INPAINT_CASES = [("euler", 1.0), ("euler", 0.5), ("dpmpp_2m", 1.0), ("dpmpp_2m", 0.5), ("euler_a", 0.5)]


@pytest.mark.parametrize("sampler, strength", INPAINT_CASES, ids=[f"{s}-{v}" for s, v in INPAINT_CASES])
def test_inpaint_4_channel_matches_diffusers(pipes, sampler, strength):
    ours, _, ref, config = pipes
    img = generate(ours, sampler, strength, mask=mask(), width=WIDTH, height=HEIGHT)
    expected = reference(ref, config, sampler, strength, mask_image=mask(), width=WIDTH, height=HEIGHT)
    assert_same_image(img, expected, f"xl-inpaint-4ch/{sampler}/strength={strength}/{WIDTH}x{HEIGHT}")


def test_inpaint_keep_unmasked_keeps_input_pixels(pipes):
    ours = pipes[0]
    img = generate(ours, "euler", 1.0, mask=mask(), keep_unmasked=True)
    assert ours.last_settings["keep_unmasked"] is True
    out, src = np.asarray(img), np.asarray(picture())
    keep = np.asarray(mask()) == 0
    assert out.shape == src.shape
    assert np.array_equal(out[keep], src[keep])
    # ... while inside the mask the picture is repainted.
    left, top, right, bottom = BOX
    inside = (slice(top + 4, bottom - 4), slice(left + 4, right - 4))  # clear of the soft inner edge
    assert np.abs(out[inside].astype(float) - src[inside].astype(float)).mean() > 10
    # Without keep_unmasked, the VAE round trip changes the kept region.
    plain = np.asarray(generate(ours, "euler", 1.0, mask=mask()))
    assert not np.array_equal(plain[keep], src[keep])
