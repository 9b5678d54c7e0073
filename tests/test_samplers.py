"""Whole sampling loops: sd's functional samplers against diffusers' scheduler loops.

No real UNet is needed: both sides drive the same fake, deterministic "UNet", a smooth
nonlinear function of its input and timestep, and record the timesteps it is told.

Our side:        x = noise * schedule.noise_scale
                 x = SAMPLERS[name].fn(Denoiser(unet, schedule, ...), x, schedule.sigmas, generator=g)
                 latents = schedule.to_latents(x)
diffusers side:  the StableDiffusionPipeline loop (init_noise_sigma, scale_model_input, step).
Both draw the initial noise first from torch.Generator("cpu").manual_seed(seed), then Euler
ancestral's per-step noise from the same generator.

Tolerance: everything runs in float32. The two sides compute the same maths in different
forms (sd in sigma space, x = x0 + sigma * eps; DDIM and DPM-Solver in diffusers keep the
variance-preserving x / sqrt(1 + sigma^2); diffusers divides by sqrt(sigma^2 + 1) where sd
multiplies by its inverse; DPM-Solver's step is exp(-h) - 1 of log-alpha minus log-sigma
differences there, expm1 of log-sigma differences here). Each step thus differs by a few
float32 ulps, and the largest difference seen is ~2.4e-6 of max|latents| (one v-prediction
step from sigma_max ~ 14.6, where one ulp of the sigma-space x is already ~1e-6; 25-step runs
stay below ~1e-6). So the final latents must agree to rtol 1e-5 and atol 1e-5 * max|latents|:
about 100x the float32 epsilon, 4x the worst case seen, and far below any real algorithmic
difference (a wrong timestep, sigma, noise scale or solver order changes the result by 1e-4
to 1; see test_tolerance_catches_a_wrong_timestep and the xfailed PLMS v-prediction case).
"""

import inspect
import math

import numpy as np
import pytest
import torch

from helpers import diffusers_scheduler, sd15
from sd.denoiser import Denoiser, lcm_boundary_condition
from sd.samplers import SAMPLERS, resolve
from sd.schedule import make_schedule, train_sigmas

SHAPE = (2, 4, 8, 12)
STEPS = (1, 4, 7, 10, 25)
RTOL = 1e-5
ATOL_FRACTION = 1e-5  # atol = ATOL_FRACTION * max|reference latents|

# Largest relative difference (max|ours - ref| / max|ref|) per sampler, for the report:
# `pytest -s` prints them at the end of the module.
WORST: dict[str, float] = {}


class FakeUNet:
    """A deterministic stand-in for the UNet: (x_in, t) -> output shaped like x_in.

    Smooth and nonlinear in x_in, and depends on t strongly enough that a wrong timestep
    shows; float32 like the real model, with the t-dependent factors taken in float64 from
    the timestep's value, so an int64 (DDIM, DPM) or float32 (Euler) timestep gives the same.
    """

    def __init__(self, prediction_type: str):
        self.prediction_type = prediction_type
        self.timesteps: list[float] = []

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        assert x_in.dtype == torch.float32 and x_in.shape == SHAPE
        if torch.is_tensor(t) and t.ndim:  # one per image, as k-diffusion's samplers ask: all the same here
            assert torch.all(t == t[0]), t
            t = t[0]
        t = float(t)
        self.timesteps.append(t)
        a = float(np.sin(t / 100.0))
        b = float(np.cos(t / 300.0))
        mix = x_in.flip(-1) * (0.2 * a) + x_in.roll(1, dims=-2) * (0.05 * b)
        if self.prediction_type == "sample":
            # x0-like: bounded, roughly data-scaled.
            return 0.8 * torch.tanh(x_in) + mix + 0.1 * b
        # eps / v-like: a bit below unit scale.
        return 0.5 * torch.tanh(x_in) + 0.3 * x_in + mix


def run_sd(sampler, cfg, n, seed=0, schedule="default"):
    sched = make_schedule(sampler, cfg, n, schedule)
    unet = FakeUNet(cfg.prediction_type)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    x = noise * sched.noise_scale
    den = Denoiser(model=unet, schedule=sched, train_sigmas=train_sigmas(cfg),
                   prediction_type=cfg.prediction_type)
    spec, _ = resolve(sampler)
    if spec.consistency:
        den = lcm_boundary_condition(den, cfg.timestep_scaling)
    needs = {"landing": sched.landing} if "landing" in spec.needs else {}
    x = spec.fn(den, x, sched.sigmas, generator=g, **needs)
    return sched.to_latents(x), unet.timesteps


def run_diffusers(sampler, cfg, n, seed=0, schedule="default"):
    scheduler = diffusers_scheduler(sampler, cfg, schedule)
    scheduler.set_timesteps(n)
    unet = FakeUNet(cfg.prediction_type)
    g = torch.Generator("cpu").manual_seed(seed)
    # As StableDiffusionPipeline.prepare_extra_step_kwargs: the generator goes to step() only
    # where step() takes one (not PNDMScheduler's); DDIM's eta stays at its default, 0.
    extra = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    latents = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(latents, t)
        out = unet(inp, t)
        latents = scheduler.step(out, t, latents, **extra).prev_sample
    return latents, unet.timesteps


def check(sampler, cfg, n, name=None, schedule="default"):
    ours, seen_ours = run_sd(sampler, cfg, n, schedule=schedule)
    ref, seen_ref = run_diffusers(sampler, cfg, n, schedule=schedule)
    # The UNet is told the same timesteps, in the same order. Euler + Karras timesteps are
    # fractional and can differ by one float32 ulp (see test_schedule.py:
    # test_euler_karras_timesteps_bitwise); everything else must be identical.
    if sampler == "euler" and schedule == "karras":
        np.testing.assert_allclose(seen_ours, seen_ref, rtol=1e-6, atol=1e-5)
    else:
        assert seen_ours == seen_ref
    assert torch.isfinite(ref).all()
    scale = ref.abs().max().item()
    rel = (ours - ref).abs().max().item() / scale
    key = name or sampler
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL_FRACTION * scale,
                               msg=lambda m: f"{key} {cfg} n={n}: {m}")
    WORST[key] = max(WORST.get(key, 0.0), rel)  # passing cases only (not the xfails)
    return ours, ref


# --- the samplers, case by case ---------------------------------------------------------

@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True], ids=["", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_euler(prediction_type, karras, spacing, n):
    cfg = sd15(prediction_type=prediction_type, timestep_spacing=spacing)
    check("euler", cfg, n, name="euler_karras" if karras else "euler", schedule="karras" if karras else "default")


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # diffusers: no "sample"
def test_euler_ancestral(prediction_type, spacing, n):
    cfg = sd15(prediction_type=prediction_type, timestep_spacing=spacing)
    check("euler_a", cfg, n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler,schedule", [("dpmpp_2m", "default"), ("dpmpp_2m", "karras"),
                                             ("dpmpp_2m_karras", "default")],
                         ids=["dpmpp_2m", "dpmpp_2m+karras", "dpmpp_2m_karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_dpmpp_2m(prediction_type, sampler, schedule, spacing, n):
    cfg = sd15(prediction_type=prediction_type, timestep_spacing=spacing)
    karras = schedule == "karras" or sampler == "dpmpp_2m_karras"
    check(sampler, cfg, n, name="dpmpp_2m_karras" if karras else "dpmpp_2m", schedule=schedule)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_leading(prediction_type, set_alpha_to_one, n):
    """SD's setting. With set_alpha_to_one False the loop ends at sigma(t=0), not 0, and
    Schedule.to_latents brings sd's sigma-space result back to diffusers' scale."""
    cfg = sd15(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    check("ddim", cfg, n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_other_spacings(prediction_type, spacing, n):
    """diffusers' DDIM lands each step on t - T//n, then starts the next from the next scheduled
    timestep; sd follows it through Schedule.landing (sample_ddim rescales the latents)."""
    check("ddim", sd15(prediction_type=prediction_type, timestep_spacing=spacing), n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_plms_leading(set_alpha_to_one, n):
    """PNDMScheduler(skip_prk_steps=True), SD 1.5's default: n + 1 UNet calls (a Heun start,
    then Adams-Bashforth up to 4th order), on DDIM's timesteps; "leading" as SD uses it."""
    check("plms", sd15(set_alpha_to_one=set_alpha_to_one), n)


@pytest.mark.parametrize("n", [1, 4, 10, 25])
def test_plms_trailing_when_steps_divide_T(n):
    """PNDM lands each step on t - T//n too: as for DDIM, "trailing" agrees only when n divides T,
    "linspace" never (past one step), by design."""
    check("plms", sd15(timestep_spacing="trailing"), n)


@pytest.mark.xfail(strict=True, reason=(
    "by design: for v-prediction, diffusers' PNDMScheduler averages / Adams-Bashforth-combines "
    "the raw v outputs and converts the combination to eps with the *current* sample and "
    "timestep; sd converts each prediction to eps at the point where it was made, as the "
    "original PLMS (CompVis ldm/models/diffusion/plms.py, predict_eps_from_z_and_v) does. "
    "Identical for epsilon models (SD 1.5), different for v models."))
@pytest.mark.parametrize("n", [4, 10])
def test_plms_v_prediction(n):
    check("plms", sd15(prediction_type="v_prediction"), n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("original_steps", [50, 25])
@pytest.mark.parametrize("timestep_scaling", [10.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lcm(prediction_type, timestep_scaling, original_steps, n):
    """LCMScheduler: its timesteps, the boundary condition, fresh noise between steps. With
    diffusers' default timestep_scaling of 10, c_skip is below 1e-5 at every timestep and
    the boundary condition is invisible at this tolerance; scaling 0.5 makes it count."""
    check("lcm", sd15(prediction_type=prediction_type, original_inference_steps=original_steps,
                      timestep_scaling=timestep_scaling, set_alpha_to_one=True), n)


@pytest.mark.parametrize("beta_schedule", ["linear"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "plms", "lcm"])
def test_linear_betas(sampler, beta_schedule):
    check(sampler, sd15(beta_schedule=beta_schedule), 10)


def test_ddim_equals_euler_on_integer_timesteps():
    """sample_ddim is sample_euler (Karras et al. 2022, section 4); the two diffusers
    schedulers agree too where their sigma lists coincide (leading, DDIM's last step)."""
    cfg = sd15(set_alpha_to_one=True)
    ddim, _ = run_sd("ddim", cfg, 10)
    ref, _ = run_diffusers("ddim", cfg, 10)
    euler_sched = make_schedule("euler", cfg, 10)
    ddim_sched = make_schedule("ddim", cfg, 10)
    assert torch.equal(euler_sched.timesteps, ddim_sched.timesteps)
    torch.testing.assert_close(euler_sched.sigmas, ddim_sched.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(ddim, ref, rtol=RTOL, atol=ATOL_FRACTION * ref.abs().max().item())


def test_euler_ancestral_uses_the_generator():
    """The per-step noise comes from the generator: another seed, other latents; same seed,
    same latents (on both sides)."""
    cfg = sd15()
    a, _ = run_sd("euler_a", cfg, 10, seed=0)
    b, _ = run_sd("euler_a", cfg, 10, seed=0)
    c, _ = run_sd("euler_a", cfg, 10, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, rtol=1e-2, atol=1e-2)


def test_tolerance_catches_a_wrong_timestep():
    """The tolerance is tight enough to see a one-step timestep shift in the UNet input."""
    cfg = sd15()
    sched = make_schedule("euler", cfg, 10)
    unet = FakeUNet("epsilon")
    shifted = lambda x, t: unet(x, t + 1)  # noqa: E731
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * sched.noise_scale
    den = Denoiser(shifted, sched, train_sigmas(cfg), "epsilon")
    wrong = SAMPLERS["euler"].fn(den, x, sched.sigmas)
    ref, _ = run_diffusers("euler", cfg, 10)
    assert not torch.allclose(wrong, ref, rtol=RTOL, atol=ATOL_FRACTION * ref.abs().max().item())


# --- the Denoiser ------------------------------------------------------------------------

def test_denoiser_timestep_fallback_matches_sigma_to_t():
    """A sigma not in the schedule (a higher-order sampler's midpoint, an img2img start) maps
    to a fractional timestep by log-sigma interpolation, like EulerDiscreteScheduler._sigma_to_t
    over diffusers' own sigma table."""
    cfg = sd15()
    sched = make_schedule("euler", cfg, 10)
    den = Denoiser(FakeUNet("epsilon"), sched, train_sigmas(cfg), "epsilon")
    ref = diffusers_scheduler("euler", cfg)
    ac = ref.alphas_cumprod
    log_sigmas = np.log((((1 - ac) / ac) ** 0.5).numpy())
    s = sched.sigmas[:-1].numpy().astype(np.float64)
    midpoints = np.sqrt(s[1:] * s[:-1])  # geometric midpoints: not in the schedule
    others = np.array([0.001, 0.03, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 14.0, 20.0])
    for sigma in np.concatenate([midpoints, others]):
        sigma32 = torch.tensor(sigma, dtype=torch.float32)
        assert float(sigma32) not in {float(v) for v in sched.sigmas}
        ours = den.timestep(sigma32)
        theirs = ref._sigma_to_t(np.float64(float(sigma32)), log_sigmas)
        assert ours.dtype == torch.float32 and ours.ndim == 0
        # One-ulp table differences (test_schedule.py) move t by < 1e-5.
        assert float(ours) == pytest.approx(float(theirs), rel=1e-6, abs=1e-5), sigma
    assert float(den.timestep(torch.tensor(100.0))) == 999.0
    assert float(den.timestep(torch.tensor(1e-4))) == 0.0


@pytest.mark.parametrize("sampler,schedule", [("ddim", "default"), ("euler", "default"), ("euler", "karras"),
                                              ("dpmpp_2m", "default"), ("dpmpp_2m_karras", "default")])
def test_denoiser_timestep_for_schedule_sigmas(sampler, schedule):
    """A sigma of the schedule maps to exactly the timestep diffusers tells the UNet, even where
    that is rounded (DPM + Karras) rather than the interpolated value."""
    cfg = sd15()
    sched = make_schedule(sampler, cfg, 10, schedule)
    den = Denoiser(FakeUNet("epsilon"), sched, train_sigmas(cfg), "epsilon")
    for s, t in zip(sched.sigmas, sched.timesteps):
        assert torch.equal(den.timestep(s), t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_x0_matches_diffusers_pred_original_sample(prediction_type):
    """One call: D(x, sigma) is EulerDiscreteScheduler.step's pred_original_sample."""
    cfg = sd15(prediction_type=prediction_type, timestep_spacing="trailing")
    sched = make_schedule("euler", cfg, 4)
    ref = diffusers_scheduler("euler", cfg)
    ref.set_timesteps(4)
    x = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(3)) * sched.noise_scale
    for i, t in enumerate(ref.timesteps):
        unet = FakeUNet(prediction_type)
        den = Denoiser(unet, sched, train_sigmas(cfg), prediction_type)
        ours = den(x, sched.sigmas[i])
        ref._step_index = i
        out = unet(ref.scale_model_input(x, t), t)
        theirs = ref.step(out, t, x).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())


def test_denoiser_rejects_unknown_prediction_type():
    sched = make_schedule("euler", sd15(), 4)
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(FakeUNet("epsilon"), sched, train_sigmas(sd15()), "flow")


def test_zz_report_largest_differences():
    """Not a check: prints the largest relative difference seen per sampler (pytest -s)."""
    for k, v in sorted(WORST.items()):
        print(f"\n  {k:16s} max|ours - diffusers| / max|diffusers| = {v:.2e}", end="")
    assert all(math.isfinite(v) for v in WORST.values())
