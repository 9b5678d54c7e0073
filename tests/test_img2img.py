"""img2img and inpainting, image for image, against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (9-channel inpainting UNet and plain 4-channel UNet).

Tiny random-weight SD 1.5-shaped models saved in the diffusers layout, fp32 on the CPU, the same
seed on both sides, a random picture and a rectangular mask at 64x48. Strengths include 1, values
below it, and one that runs a single step. Tolerance as in test_pipeline.py: max
|ours_uint8 - ref_float * 255| <= 0.51, i.e. rounding only.
"""

import io

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

import sd
from helpers import (GUIDANCE, PROMPT, SAMPLERS, SD15_SCHEDULE, SEED, STEPS, assert_same_image, picture, save_folder,
                     tiny_sd15_components)

W, H = 64, 48  # helpers.picture's default size


def rectangle_mask(w=W, h=H) -> Image.Image:
    """White (repaint) rectangle, deliberately not aligned with the latent grid."""
    m = np.zeros((h, w), np.uint8)
    m[11:33, 19:51] = 255
    return Image.fromarray(m)


def reference(pipe, sampler, **kwargs) -> np.ndarray:
    pipe.scheduler = SAMPLERS[sampler].from_config(SD15_SCHEDULE)
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **kwargs).images[0]


def from_folder(cls, folder):
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    return save_folder(tiny_sd15_components(), DDIMScheduler(**SD15_SCHEDULE), tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    return save_folder(tiny_sd15_components(in_channels=9), DDIMScheduler(**SD15_SCHEDULE),
                       tmp_path_factory.mktemp("sd15-inpaint"))


@pytest.fixture(scope="module")
def plain(plain_folder):
    return sd.load(plain_folder, device="cpu")


@pytest.fixture(scope="module")
def inpainter(inpaint_folder):
    return sd.load(inpaint_folder, device="cpu")


# ---------------------------------------------------------------- img2img

# 0.2 x 6 steps runs a single step.
@pytest.mark.parametrize("strength", [1.0, 0.55, 0.2])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_matches_diffusers(plain, plain_folder, sampler, strength):
    ref = reference(from_folder(StableDiffusionImg2ImgPipeline, plain_folder), sampler, image=picture(),
                    strength=strength)
    ours = plain.generate(PROMPT, image=picture(), strength=strength, num_steps=STEPS, guidance=GUIDANCE,
                          seed=SEED, sampler=sampler)
    assert plain.last_settings["strength"] == strength
    assert_same_image(ours, ref, f"img2img {sampler} strength {strength}")


def test_default_size_is_the_image_size_rounded_down_to_8(plain):
    out = plain.generate(PROMPT, image=picture(83, 61), strength=0.5, num_steps=2, seed=1)
    assert out.size == (80, 56) and plain.last_settings["width"] == 80 and plain.last_settings["height"] == 56
    assert plain.generate(PROMPT, image=picture(83, 61), width=32, strength=0.5, num_steps=2, seed=1).size == (32, 56)


def test_encoded_photos_are_turned_upright_by_their_exif_orientation(plain):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    picture().save(buffer, format="JPEG", exif=exif)
    out = plain.generate(PROMPT, image=buffer.getvalue(), strength=0.5, num_steps=2, seed=1)
    assert out.size == (H, W)


def test_pictures_and_masks_are_resized_like_diffusers(plain, plain_folder):
    """An 83x61 picture and mask asked for at 64x48 are Lanczos-resized as diffusers' processor does.
    (diffusers' img2img pipeline takes no size; its inpainting pipeline does.)"""
    big_picture, big_mask = picture(83, 61, seed=1), rectangle_mask().resize((83, 61), Image.BILINEAR)
    ref = reference(from_folder(StableDiffusionInpaintPipeline, plain_folder), "euler", image=big_picture,
                    mask_image=big_mask, strength=0.7, width=W, height=H)
    ours = plain.generate(PROMPT, image=big_picture, mask=big_mask, strength=0.7, width=W, height=H,
                          num_steps=STEPS, guidance=GUIDANCE, seed=SEED, sampler="euler")
    assert_same_image(ours, ref, "83x61 picture and mask at 64x48")


def test_img2img_small_strength_stays_close_to_the_input(plain):
    """Closeness to the input grows as strength falls (a check of the rule, not of parity)."""
    source = np.asarray(picture(), dtype=np.float64)
    distance = [np.abs(np.asarray(plain.generate(PROMPT, image=picture(), strength=s, num_steps=10, seed=1,
                                                 sampler="ddim"), dtype=np.float64) - source).mean()
                for s in (1.0, 0.5, 0.1)]
    assert distance[0] > distance[1] > distance[2]


def test_zero_steps_returns_the_input(plain):
    """int(num_steps * strength) == 0: nothing to run, so the (resized) input comes back unchanged."""
    for strength in (0.0, 0.1):
        out = plain.generate(PROMPT, image=picture(), strength=strength, num_steps=6, seed=1)
        assert np.array_equal(np.asarray(out), np.asarray(picture()))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_as_encoded_bytes(plain, fmt):
    buffer = io.BytesIO()
    picture().save(buffer, format=fmt)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    kwargs = dict(strength=0.5, num_steps=4, seed=2, sampler="euler")
    from_bytes = plain.generate(PROMPT, image=buffer.getvalue(), **kwargs)
    from_pil = plain.generate(PROMPT, image=decoded, **kwargs)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_pil))


# ---------------------------------------------------------------- inpainting

@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("unet", ["9-channel", "4-channel"])
def test_inpainting_matches_diffusers(plain, plain_folder, inpainter, inpaint_folder, unet, sampler, strength):
    ours_pipe, folder = (inpainter, inpaint_folder) if unet == "9-channel" else (plain, plain_folder)
    ref = reference(from_folder(StableDiffusionInpaintPipeline, folder), sampler, image=picture(),
                    mask_image=rectangle_mask(), strength=strength, width=W, height=H)
    ours = ours_pipe.generate(PROMPT, image=picture(), mask=rectangle_mask(), strength=strength, num_steps=STEPS,
                              guidance=GUIDANCE, seed=SEED, sampler=sampler)
    assert_same_image(ours, ref, f"inpaint {unet} {sampler} strength {strength}")


@pytest.mark.parametrize("unet", ["9-channel", "4-channel"])
def test_keep_unmasked_pastes_the_input_back_exactly(plain, inpainter, unet):
    pipe = inpainter if unet == "9-channel" else plain
    kwargs = dict(image=picture(), mask=rectangle_mask(), num_steps=4, seed=5)
    raw = np.asarray(pipe.generate(PROMPT, **kwargs)).astype(int)
    kept = np.asarray(pipe.generate(PROMPT, keep_unmasked=True, **kwargs)).astype(int)
    source = np.asarray(picture()).astype(int)
    outside = np.asarray(rectangle_mask()) < 128
    assert np.array_equal(kept[outside], source[outside])
    assert np.abs(raw[outside] - source[outside]).max() > 2, "the VAE round trip should change the unmasked area"
    deep_inside = np.zeros_like(outside)
    deep_inside[11 + 4:33 - 4, 19 + 4:51 - 4] = True  # beyond the 3-pixel soft edge
    assert np.array_equal(kept[deep_inside], raw[deep_inside])
    assert pipe.last_settings["keep_unmasked"] is True


def test_mask_of_another_size_is_resized(plain):
    """A mask at twice the size (same aspect ratio) is resized to the working size."""
    big = rectangle_mask().resize((2 * W, 2 * H), Image.NEAREST)
    kwargs = dict(image=picture(), num_steps=3, seed=4, sampler="euler")
    assert np.array_equal(np.asarray(plain.generate(PROMPT, mask=big, **kwargs)),
                          np.asarray(plain.generate(PROMPT, mask=rectangle_mask(), **kwargs)))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=rectangle_mask()), "mask: needs an image"),
    (dict(image=b"not an image"), "image: not a readable image"),
    (dict(image=b"\x89PNG\r\n\x1a\n" + b"\0" * 30), "image: not a readable image"),
    (dict(image=12), "image: must be a PIL image"),
    (dict(image=picture(), mask=b"GIF89a-junk"), "mask: not a readable image"),
    (dict(image=picture(), mask=rectangle_mask(48, 64)), "mask: must have the image's aspect ratio"),
    (dict(image=picture(), strength=1.5), r"strength: must be a number in \[0, 1\], got 1.5"),
    (dict(image=picture(), strength=-0.1), r"strength: must be a number in \[0, 1\]"),
    (dict(image=picture(), strength="0.5"), r"strength: must be a number in \[0, 1\]"),
    (dict(image=picture(), strength=float("nan")), r"strength: must be a number in \[0, 1\]"),
    (dict(strength=0.5), "strength: only applies with an image"),
    (dict(image=picture(), keep_unmasked=True), "keep_unmasked: only applies to inpainting"),
    (dict(image=picture(4, 4)), "image: must be at least 8x8 pixels"),
])
def test_bad_input_names_the_field(plain, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plain.generate(PROMPT, num_steps=2, **kwargs)


def test_truncated_image_file_is_a_clear_error(plain):
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    with pytest.raises(ValueError, match="image: not a readable image"):
        plain.generate(PROMPT, image=buffer.getvalue()[:200], num_steps=2)


def test_inpainting_model_needs_a_mask(inpainter):
    for kwargs in ({}, {"image": picture()}):
        with pytest.raises(ValueError, match="mask: this is an inpainting model"):
            inpainter.generate(PROMPT, num_steps=2, **kwargs)
