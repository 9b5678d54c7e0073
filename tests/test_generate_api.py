"""The open generate() API and its public parts (issue 14, part 3).

Most checks run on the tiny shapes model shipped with sd (64x64, milliseconds a step): batches,
the per-step callback, latents out, custom samplers, explicit sigmas, the denoiser under
autograd. guidance_rescale is compared with diffusers' own on a tiny random SD 1.5 folder,
image for image (max |ours - diffusers * 255| <= 0.51, as the other parity tests).
"""

import threading

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

import sd
from helpers import assert_same_image, tiny_sd15_components
from sd import denoiser as denoiser_module
from sd.samplers import SAMPLERS, randn
from sd.tiny import CHECKPOINT

PROMPT = "a small red circle on the left, blue background"
# Images from a batch of B and from B single runs differ only by the rounding of batched matmuls.
BATCH_LEVELS = 1


@pytest.fixture(scope="module")
def tiny():
    return sd.load(CHECKPOINT, device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_within(a, b, levels, what):
    diff = np.abs(pixels(a) - pixels(b)).max()
    assert diff <= levels, f"{what}: images differ by {diff} levels (allowed {levels})"


def shapes_picture(seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def left_half_mask() -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    return Image.fromarray(mask)


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "lcm"])
def test_a_batch_gives_each_seed_its_single_image(tiny, sampler):
    """num_images=3 from seed 10 is one UNet batch whose image k is what seed 10+k gives alone,
    samplers that draw noise every step included (each image draws from its own generator)."""
    kw = dict(num_steps=6, sampler=sampler)
    batch = tiny.generate(PROMPT, seed=10, num_images=3, **kw)
    assert isinstance(batch, list) and len(batch) == 3
    for k, image in enumerate(batch):
        assert image.info["sd"]["seed"] == 10 + k
        assert_within(image, tiny.generate(PROMPT, seed=10 + k, **kw), BATCH_LEVELS, f"{sampler} image {k}")
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 10, "two seeds gave the same picture"


def test_prompt_and_seed_lists(tiny):
    prompts = ["a green square at the top", "a yellow triangle at the bottom, black background"]
    batch = tiny.generate(prompts, negative_prompt=["blurry", "dark"], seed=[3, 99], num_steps=5)
    for image, prompt, negative, seed in zip(batch, prompts, ["blurry", "dark"], [3, 99]):
        assert (image.info["sd"]["prompt"], image.info["sd"]["seed"]) == (prompt, seed)
        alone = tiny.generate(prompt, negative_prompt=negative, seed=seed, num_steps=5)
        assert_within(image, alone, BATCH_LEVELS, prompt)


def test_a_single_request_gives_a_single_image(tiny):
    assert isinstance(tiny.generate(PROMPT, seed=1, num_steps=2), Image.Image)
    assert isinstance(tiny.generate(PROMPT, seed=[1], num_steps=2), list)  # a list asked for: a list back


@pytest.mark.parametrize("kwargs", [dict(num_images=2, seed=[1, 2, 3]), dict(prompt=["a", "b"], num_images=3),
                                    dict(negative_prompt=["x", "y"], seed=[1, 2, 3])])
def test_batch_sizes_must_agree(tiny, kwargs):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(sd.InputError, match="batch sizes"):
        tiny.generate(num_steps=1, **kwargs)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_batches_with_an_input_picture(tiny, mode):
    """img2img and inpainting batch too: each image's VAE sample and noise come from its own seed."""
    extra = dict(image=shapes_picture(), strength=0.7)
    if mode == "inpaint":
        extra["mask"] = left_half_mask()
    batch = tiny.generate(PROMPT, seed=[4, 5], num_steps=6, **extra)
    for image, seed in zip(batch, [4, 5]):
        assert_within(image, tiny.generate(PROMPT, seed=seed, num_steps=6, **extra), BATCH_LEVELS, f"{mode} {seed}")


@pytest.fixture(scope="module")
def nine_channel(tmp_path_factory):
    """A tiny random SD 1.5 inpainting (9-channel UNet) folder, loaded by sd."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    path = tmp_path_factory.mktemp("inpaint9")
    StableDiffusionInpaintPipeline(**tiny_sd15_components(in_channels=9), scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(path)
    return sd.load(path, device="cpu")


def test_nine_channel_inpainting_batches(nine_channel):
    kw = dict(image=shapes_picture(1), mask=left_half_mask(), num_steps=4, width=64, height=64)
    batch = nine_channel.generate(PROMPT, seed=[7, 8], **kw)
    for image, seed in zip(batch, [7, 8]):
        assert_within(image, nine_channel.generate(PROMPT, seed=seed, **kw), BATCH_LEVELS, f"9-channel {seed}")


def test_settings_come_back_with_each_image_across_threads(tiny):
    """Each call's settings ride on its own result, so threads sharing a pipeline never see each
    other's (pipe.last_settings, kept for old callers, would race)."""
    results = {}

    def run(seed):
        results[seed] = tiny.generate(PROMPT, seed=seed, num_steps=3).info["sd"]["seed"]

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {s: s for s in range(6)}


# ---------------------------------------------------------------- the callback


def test_callback_sees_every_step(tiny):
    steps = []
    image = tiny.generate(PROMPT, seed=2, num_steps=5, sampler="euler", callback=steps.append)
    sigmas = tiny.sigmas(5, sampler="euler")
    assert [s.i for s in steps] == list(range(5)) and all(s.n == 5 for s in steps)
    assert [float(s.sigma) for s in steps] == [float(v) for v in sigmas[:-1]]
    assert [float(s.sigma_next) for s in steps] == [float(v) for v in sigmas[1:]]
    assert steps[0].x.shape == steps[0].denoised.shape == (1, 4, 8, 8)
    # The last step of Euler lands on sigma 0: x is then the final latents, which decode to the image.
    assert np.array_equal(pixels(tiny.decode(steps[-1].x)[0]), pixels(image))


def test_callback_returning_a_tensor_replaces_x(tiny):
    """A hook that moves x changes what follows; returning None keeps it."""
    plain = tiny.generate(PROMPT, seed=2, num_steps=4, sampler="euler", callback=lambda step: None)
    same = tiny.generate(PROMPT, seed=2, num_steps=4, sampler="euler")
    assert np.array_equal(pixels(plain), pixels(same))
    zeroed = tiny.generate(PROMPT, seed=2, num_steps=4, sampler="euler",
                           callback=lambda step: torch.zeros_like(step.x) if step.i == step.n - 1 else None)
    assert np.array_equal(pixels(zeroed), pixels(tiny.decode(torch.zeros(1, 4, 8, 8))[0]))


def test_callback_runs_after_inpaintings_blend(tiny):
    """Inpainting with a plain UNet re-imposes the known region after each step through the same
    callback chain, before the caller's hook: the caller sees the blended x."""
    seen = []
    kw = dict(image=shapes_picture(), mask=left_half_mask(), num_steps=4, seed=3, strength=1.0)
    tiny.generate(PROMPT, callback=lambda step: seen.append(step.x.clone()), **kw)
    kept = tiny.encode(sd.images.image_tensor(shapes_picture()), torch.Generator("cpu").manual_seed(3))
    # After the last step the known (right) half is the clean image latents, as diffusers leaves it.
    torch.testing.assert_close(seen[-1][..., 4:], kept[..., 4:], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- latents, parts, custom loops


def test_latent_output_decodes_to_the_image(tiny):
    image = tiny.generate(PROMPT, seed=5, num_steps=4)
    latents = tiny.generate(PROMPT, seed=5, num_steps=4, output="latent")
    assert isinstance(latents, sd.Latents) and latents.tensor.shape == (1, 4, 8, 8)
    assert latents.settings[0]["seed"] == 5
    assert np.array_equal(pixels(tiny.decode(latents)[0]), pixels(image))


def test_a_custom_loop_on_the_public_parts_is_generate(tiny):
    """pipe.schedule + pipe.noise + pipe.denoiser + a registered sampler + pipe.decode reproduce
    generate() bit for bit."""
    schedule = tiny.schedule(6, sampler="euler")
    denoise = tiny.denoiser(PROMPT, schedule=schedule)
    x = tiny.noise(11) * schedule.noise_scale
    x = SAMPLERS["euler"].fn(denoise, x, schedule.sigmas)
    ours = tiny.decode(x)[0]
    assert np.array_equal(pixels(ours), pixels(tiny.generate(PROMPT, seed=11, num_steps=6, sampler="euler")))


def test_the_denoiser_takes_one_sigma_per_image(tiny):
    """k-diffusion's samplers pass sigma as a (B,) tensor: the same as the scalar."""
    denoise = tiny.denoiser([PROMPT, "a blue square"])
    x = tiny.noise([1, 2]) * 3.0
    sigma = torch.tensor(3.0)
    torch.testing.assert_close(denoise(x, sigma * torch.ones(2)), denoise(x, sigma), rtol=0, atol=0)


def test_the_denoiser_runs_under_autograd(tiny):
    """Gradient guidance: d(loss on x0)/dx flows through the UNet and the guidance."""
    denoise = tiny.denoiser(PROMPT)
    x = (tiny.noise(0) * 2.0).requires_grad_()
    with torch.enable_grad():
        loss = denoise(x, torch.tensor(2.0)).square().mean()
        (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_a_sampler_of_ones_own(tiny):
    """Any function with the sampler contract is a sampler; its options are checked by name."""
    def sample_scaled_euler(model, x, sigmas, *, generator=None, callback=None, scale=1.0):
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i])
            x = x + scale * (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    ours = tiny.generate(PROMPT, seed=4, num_steps=5, sampler=sample_scaled_euler, sampler_options={"scale": 1.0})
    euler = tiny.generate(PROMPT, seed=4, num_steps=5, sampler="euler")
    assert np.array_equal(pixels(ours), pixels(euler))
    assert ours.info["sd"]["sampler"] == "sample_scaled_euler"
    with pytest.raises(sd.InputError, match="sample_scaled_euler takes no option 'eta'"):
        tiny.generate(PROMPT, num_steps=1, sampler=sample_scaled_euler, sampler_options={"eta": 1})


def test_options_a_sampler_does_not_take_are_errors(tiny):
    with pytest.raises(sd.InputError, match=r"dpmpp_2m takes no option 'eta'"):
        tiny.generate(PROMPT, num_steps=1, sampler="dpmpp_2m", sampler_options={"eta": 0.5})
    # an option it does take works and changes the picture
    a = tiny.generate(PROMPT, seed=1, num_steps=4, sampler="euler_a", sampler_options={"eta": 0.0})
    b = tiny.generate(PROMPT, seed=1, num_steps=4, sampler="euler_a")
    assert np.abs(pixels(a) - pixels(b)).max() > 5


def test_explicit_sigmas_equal_the_named_schedule(tiny):
    sigmas = tiny.sigmas(7, sampler="euler", schedule="karras")
    a = tiny.generate(PROMPT, seed=6, sampler="euler", sigmas=sigmas)
    b = tiny.generate(PROMPT, seed=6, sampler="euler", schedule="karras", num_steps=7)
    assert np.array_equal(pixels(a), pixels(b))
    assert a.info["sd"]["sigmas"] == pytest.approx([float(s) for s in sigmas])
    with pytest.raises(sd.InputError, match="sigmas: must be finite, non-negative and strictly descending"):
        tiny.generate(PROMPT, sigmas=[1.0, 2.0, 0.0])


def test_unknown_schedule_names_the_choices(tiny):
    with pytest.raises(sd.InputError, match="schedule: 'wavy' is not one of default, karras"):
        tiny.generate(PROMPT, num_steps=1, schedule="wavy")


def test_alias_keeps_working_and_fixes_its_schedule(tiny):
    a = tiny.generate(PROMPT, seed=3, num_steps=5, sampler="dpmpp_2m_karras")
    b = tiny.generate(PROMPT, seed=3, num_steps=5, sampler="dpmpp_2m", schedule="karras")
    assert np.array_equal(pixels(a), pixels(b))
    with pytest.raises(sd.InputError, match="dpmpp_2m_karras is dpmpp_2m on the karras schedule"):
        tiny.generate(PROMPT, num_steps=1, sampler="dpmpp_2m_karras", schedule="default")


# ---------------------------------------------------------------- guidance


def test_a_guidance_function_in_x0_space_equals_plain_cfg(tiny):
    """For an epsilon model x0 = x - sigma * eps is linear in eps, so CFG on the two x0 predictions
    is CFG on the noise predictions: the same picture up to float rounding."""
    def cfg(uncond, cond, sigma, scale=4.0):
        return uncond + scale * (cond - uncond)

    ours = tiny.generate(PROMPT, seed=8, num_steps=5, guidance=cfg)
    plain = tiny.generate(PROMPT, seed=8, num_steps=5, guidance=4.0)
    assert_within(ours, plain, 1, "CFG as a function")
    assert ours.info["sd"]["guidance"] == "cfg"


def test_a_guidance_interval(tiny):
    """Guidance only in the middle of the noise range (Kynkaanniemi et al. 2024) changes the image:
    the function really is used at every step."""
    seen = []

    def interval(uncond, cond, sigma):
        seen.append(float(sigma))
        return uncond + 4.0 * (cond - uncond) if 0.5 < float(sigma) < 5 else cond

    image = tiny.generate(PROMPT, seed=8, num_steps=5, sampler="euler", guidance=interval)
    assert seen == [float(s) for s in tiny.sigmas(5, sampler="euler")[:-1]]
    assert np.abs(pixels(image) - pixels(tiny.generate(PROMPT, seed=8, num_steps=5, sampler="euler",
                                                      guidance=4.0))).max() > 2


@pytest.fixture(scope="module")
def sd15_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("rescale")
    StableDiffusionPipeline(**tiny_sd15_components(), scheduler=EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(path)
    ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return sd.load(path, device="cpu"), ref


def _rescaled(pipe_pair, phi):
    ours, ref = pipe_pair
    kw = dict(width=64, height=48, guidance_scale=7.0, num_inference_steps=5)
    mine = ours.generate("a red circle", width=64, height=48, guidance=7.0, num_steps=5, seed=2,
                         guidance_rescale=phi)
    theirs = ref("a red circle", generator=torch.Generator("cpu").manual_seed(2), guidance_rescale=phi,
                 output_type="np", **kw).images[0]
    return mine, theirs


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_guidance_rescale_matches_diffusers(sd15_pair, phi):
    mine, theirs = _rescaled(sd15_pair, phi)
    assert_same_image(mine, theirs, f"guidance_rescale={phi}")


def test_guidance_rescale_parity_catches_a_wrong_formula(sd15_pair, monkeypatch):
    """The parity check sees a rescale mixed with the wrong weight (phi / 2)."""
    right = denoiser_module.rescale_guidance
    monkeypatch.setattr(denoiser_module, "rescale_guidance", lambda g, c, phi: right(g, c, phi / 2))
    mine, theirs = _rescaled(sd15_pair, 0.7)
    with pytest.raises(AssertionError, match="max pixel difference"):
        assert_same_image(mine, theirs, "broken rescale")


def test_guidance_range_is_the_http_schemas(tiny):
    for bad in (-1, 1e30, float("nan"), True):
        with pytest.raises(sd.InputError, match=r"guidance: must be a number in \[0, 100\]"):
            tiny.generate(PROMPT, num_steps=1, guidance=bad)


def test_randn_with_a_list_draws_each_row_from_its_generator():
    rows = randn((3, 2, 2), [torch.Generator().manual_seed(s) for s in (5, 6, 7)], "cpu")
    for row, seed in zip(rows, (5, 6, 7)):
        assert torch.equal(row[None], torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------- never waiting on the device


@pytest.fixture(scope="module")
def on_meta():
    return sd.load(CHECKPOINT, device="meta")


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampling_never_reads_a_device_tensor(on_meta, sampler):
    """On a GPU, reading a device tensor from Python (float(), .item(), a comparison used in an
    `if`) makes the host wait for the device at every step. The meta device has no data, so any such
    read fails: a run that ends there reads none (the sigmas stay on the CPU, as diffusers keeps them)."""
    latents = on_meta.generate(PROMPT, seed=1, num_steps=4, sampler=sampler, output="latent", num_images=2)
    assert latents.tensor.device.type == "meta" and latents.tensor.shape == (2, 4, 8, 8)


def test_img2img_inpainting_and_options_never_read_a_device_tensor(on_meta):
    picture = shapes_picture()
    on_meta.generate(PROMPT, image=picture, strength=0.6, num_steps=4, output="latent")
    on_meta.generate(PROMPT, image=picture, mask=left_half_mask(), num_steps=4, output="latent")
    on_meta.generate(PROMPT, num_steps=4, step_cache=2, guidance_rescale=0.5, output="latent")
    on_meta.generate(PROMPT, num_steps=4, guidance=lambda u, c, s: u + 3 * (c - u), output="latent")
