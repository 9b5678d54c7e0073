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

import copy
import functools
import importlib.util
import inspect
import itertools
import math
import os
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TWINS, diffusers_scheduler, sd15
from sd import samplers
from sd.denoiser import Denoiser, lcm_boundary_condition
from sd.errors import InputError
from sd.samplers import SAMPLERS, resolve, sampler_table, twin_of
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
        t = float(torch.as_tensor(t).float())  # the UNet's time embedding is float32 (KDPM2's t can be float64)
        self.timesteps.append(t)
        a = float(np.sin(t / 100.0))
        b = float(np.cos(t / 300.0))
        mix = x_in.flip(-1) * (0.2 * a) + x_in.roll(1, dims=-2) * (0.05 * b)
        if self.prediction_type == "sample":
            # x0-like: bounded, roughly data-scaled.
            return 0.8 * torch.tanh(x_in) + mix + 0.1 * b
        # eps / v-like: a bit below unit scale.
        return 0.5 * torch.tanh(x_in) + 0.3 * x_in + mix


def run_sd(sampler, cfg, n, seed=0, schedule="default", options=None, fn=None):
    """sd's loop; `fn` stands in for the registered function (test_a_wrong_coefficient_fails)."""
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
    x = (fn or spec.fn)(den, x, sched.sigmas, generator=g, **needs, **spec.check_options(options or {}))
    return sched.to_latents(x), unet.timesteps


@functools.lru_cache(maxsize=None)
def built_twin(sampler, cfg, schedule, settings):
    # KDPM2's constructor alone takes 0.3 s (it sets 1000 timesteps up, midpoints included).
    return diffusers_scheduler(sampler, cfg, schedule, **dict(settings))


def run_diffusers(sampler, cfg, n, seed=0, schedule="default", options=None):
    options = dict(options or {})
    # LMS takes its order at each step(); the others' options are scheduler settings.
    step_options = {"order": options.pop("order")} if sampler == "lms" and "order" in options else {}
    scheduler = copy.deepcopy(built_twin(sampler, cfg, schedule, tuple(sorted(options.items()))))
    scheduler.set_timesteps(n)
    if sampler == "deis" and options.get("order") == 3:
        # DEIS's third-order closed forms cancel badly in float32 (up to 2e-4 of the step; sd
        # integrates in float64): diffusers' own code, its sigma table in float64, is the reference.
        scheduler.sigmas = scheduler.sigmas.double()
    unet = FakeUNet(cfg.prediction_type)
    g = torch.Generator("cpu").manual_seed(seed)
    # As StableDiffusionPipeline.prepare_extra_step_kwargs: the generator goes to step() only
    # where step() takes one (not PNDMScheduler's); DDIM's eta stays at its default, 0.
    extra = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    latents = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(latents, t)
        out = unet(inp, t)
        latents = scheduler.step(out, t, latents, **extra, **step_options).prev_sample
    return latents, unet.timesteps


# KDPM2's second UNet call of each step is at a log-midpoint sigma, whose timestep diffusers
# interpolates in float32 (and sd in float64): up to 6e-5 apart, and 1.6e-3 where a midpoint
# lands exactly on the next step's sigma, which sd tells the UNet as that step's own scheduled
# timestep and diffusers as interpolated (Euler ancestral's eta = 1 split makes the log-midpoint
# of sigma and sigma_next^2 / sigma exactly sigma_next). The latents stay within the tolerance.
MIDPOINT_SAMPLERS = ("dpm_2", "dpm_2_ancestral")
MIDPOINT_ATOL = 2e-3


def check(sampler, cfg, n, name=None, schedule="default", options=None, fn=None):
    ours, seen_ours = run_sd(sampler, cfg, n, schedule=schedule, options=options, fn=fn)
    ref, seen_ref = run_diffusers(sampler, cfg, n, schedule=schedule, options=options)
    # The UNet is told the same timesteps, in the same order. Euler + Karras timesteps are
    # fractional and can differ by one float32 ulp (see test_schedule.py:
    # test_euler_karras_timesteps_bitwise); KDPM2's midpoints, above; everything else is identical.
    if sampler == "euler" and schedule == "karras":
        np.testing.assert_allclose(seen_ours, seen_ref, rtol=1e-6, atol=1e-5)
    elif sampler in MIDPOINT_SAMPLERS:
        assert seen_ours[::2] == seen_ref[::2] and len(seen_ours) == len(seen_ref)
        np.testing.assert_allclose(seen_ours[1::2], seen_ref[1::2], rtol=0, atol=MIDPOINT_ATOL)
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
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "plms", "lcm", "heun",
                                     "dpm_2", "dpm_2_ancestral", "lms", "ddpm", "dpmpp_2m_sde", "unipc", "deis"])
def test_linear_betas(sampler, beta_schedule):
    check(sampler, sd15(beta_schedule=beta_schedule), 10)


# --- the samplers added with their twins: each option diffusers has, every spacing --------
# Each sampler's default options over every prediction type, spacing and step count; its other
# options (settings of the diffusers twin: solver order and type, LMS's order), and the twins that
# are slow to build or step (KDPM2's constructor, LMS's quadratures), on three of those pairs:
# the whole grid with SD_SLOW_TESTS=1. KDPM2 (dpm_2*) takes no "sample" prediction in diffusers.

SLOW = bool(os.environ.get("SD_SLOW_TESTS"))
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TWIN_CASES = [("heun", {}), ("dpm_2", {}), ("dpm_2_ancestral", {}), ("lms", {}), ("lms", {"order": 2}),
              ("ddpm", {}), ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}),
              ("unipc", {}), ("unipc", {"order": 1}), ("unipc", {"order": 3}),
              ("deis", {}), ("deis", {"order": 1}), ("deis", {"order": 3})]


def case_id(sampler, options):
    return sampler + "".join(f"-{k}={v}" for k, v in options.items())


def predictions(sampler):
    return PREDICTIONS[:2] if sampler in MIDPOINT_SAMPLERS else PREDICTIONS


def grid(sampler, options):
    """(prediction type, spacing) pairs to run."""
    if SLOW or not (options or sampler in MIDPOINT_SAMPLERS + ("lms",)):
        return [(p, s) for p in predictions(sampler) for s in SPACINGS]
    return [("epsilon", "leading"), ("v_prediction", "trailing"), (predictions(sampler)[-1], "linspace")]


@pytest.mark.parametrize("sampler,options", TWIN_CASES, ids=[case_id(*c) for c in TWIN_CASES])
def test_twin(sampler, options):
    for prediction_type, spacing in grid(sampler, options):
        for n in STEPS:
            check(sampler, sd15(prediction_type=prediction_type, timestep_spacing=spacing), n,
                  name=case_id(sampler, options), options=options)


FLAG_TWINS = ["euler", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "deis"]
FLAG_CASES = [(s, f) for s in FLAG_TWINS for f in ("karras", "exponential", "beta")
              if (s, f) not in (("euler", "karras"), ("dpmpp_2m", "karras"))]  # those two: above


@pytest.mark.parametrize("sampler,schedule", FLAG_CASES, ids=[f"{s}+{f}" for s, f in FLAG_CASES])
def test_twin_on_flag_schedules(sampler, schedule):
    """schedule="karras" / "exponential" / "beta" against the twin with use_<schedule>_sigmas=True.
    (DEIS in one step: test_deis_flag_in_one_step; KDPM2 ancestral on Karras sigmas:
    test_dpm_2_ancestral_karras.)"""
    if sampler == "dpm_2_ancestral" and schedule == "karras":
        pytest.skip("test_dpm_2_ancestral_karras")
    pairs = [(p, s) for p in predictions(sampler)[:2] for s in SPACINGS]
    if not SLOW:  # one pair per flag, each flag another
        pairs = [pairs[("karras", "exponential", "beta").index(schedule) * 2 + 1]]
    for prediction_type, spacing in pairs:
        for n in STEPS if sampler != "deis" else STEPS[1:]:
            check(sampler, sd15(prediction_type=prediction_type, timestep_spacing=spacing), n,
                  name=f"{sampler}+{schedule}", schedule=schedule)


@pytest.mark.xfail(strict=True, reason=(
    "a diffusers bug: DEISMultistepScheduler with a use_*_sigmas flag ends its sigmas with the last "
    "respaced one repeated, so in one step it goes from sigma_max to sigma_max and returns the noise; "
    "sd's DEIS runs end at sigma_min, the level its default schedule and longer flagged runs end at."))
@pytest.mark.parametrize("schedule", ["karras", "exponential", "beta"])
def test_deis_flag_in_one_step(schedule):
    check("deis", sd15(), 1, schedule=schedule)


@pytest.mark.xfail(strict=True, reason=(
    "a diffusers bug: UniPCMultistepScheduler(solver_type='bh1') ends in NaN on the step to sigma = 0, "
    "where its B(h) = -h is -inf and multiplies a zero correction; sd's last step lands on x0"))
def test_unipc_bh1_last_step():
    check("unipc", sd15(), 10, options={"solver_type": "bh1"})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unipc_bh1(prediction_type):
    """UniPC with B(h) = -h (its bh1 variant), up to the last step (test_unipc_bh1_last_step): the
    latents diffusers holds after n - 1 steps are sd's, variance-preserving."""
    for spacing in SPACINGS:
        for n in STEPS[1:]:
            cfg = sd15(prediction_type=prediction_type, timestep_spacing=spacing)
            sched = make_schedule("unipc", cfg, n)
            seen = {}
            g = torch.Generator("cpu").manual_seed(0)
            x = torch.randn(SHAPE, generator=g) * sched.noise_scale
            den = Denoiser(FakeUNet(prediction_type), sched, train_sigmas(cfg), prediction_type)
            SAMPLERS["unipc"].fn(den, x, sched.sigmas, solver_type="bh1",
                                 callback=lambda step: seen.setdefault(step.i, step.x))
            ours = seen[n - 2] / (1 + sched.sigmas[n - 1] ** 2) ** 0.5
            twin = diffusers_scheduler("unipc", cfg, solver_type="bh1")
            twin.set_timesteps(n)
            g = torch.Generator("cpu").manual_seed(0)
            latents, unet = torch.randn(SHAPE, generator=g), FakeUNet(prediction_type)
            for t in twin.timesteps[:-1]:
                latents = twin.step(unet(latents, t), t, latents).prev_sample
            torch.testing.assert_close(ours, latents, rtol=RTOL, atol=ATOL_FRACTION * latents.abs().max().item())


def test_dpm_2_ancestral_karras():
    """KDPM2 ancestral rounds Karras sigmas' timesteps. Where a midpoint sigma is exactly the next
    step's sigma (eta = 1 makes them equal, float32 often keeps them so), sd tells the UNet that
    step's rounded timestep and diffusers the interpolated one, up to 0.5 apart: the tolerance is
    1e-3 here, and the timesteps must differ only at such midpoints."""
    for prediction_type, spacing in [("epsilon", "leading"), ("v_prediction", "linspace")]:
        for n in (4, 10, 25):
            cfg = sd15(prediction_type=prediction_type, timestep_spacing=spacing)
            ours, seen_ours = run_sd("dpm_2_ancestral", cfg, n, schedule="karras")
            ref, seen_ref = run_diffusers("dpm_2_ancestral", cfg, n, schedule="karras")
            assert seen_ours[::2] == seen_ref[::2] and len(seen_ours) == len(seen_ref) == 2 * n - 1
            for k in range(1, len(seen_ours), 2):
                if abs(seen_ours[k] - seen_ref[k]) > MIDPOINT_ATOL:
                    assert seen_ours[k] == seen_ours[k + 1] and abs(seen_ours[k] - seen_ref[k]) <= 0.5, k
            torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


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


# --- k-diffusion: the samplers without a twin, and a second opinion on the others ---------
# k_diffusion.sampling from the installed k-diffusion package, run on the same denoiser, sigmas,
# starting noise and fresh noise as sd. k-diffusion's package __init__ imports its training stack
# (torchvision, wandb, clean-fid...), which the test extra does not install: only sampling.py is
# loaded, under a stand-in package whose utils module gives the one helper it uses (append_dims).
# Its deps (scipy, torchsde, torchdiffeq, tqdm) are in the test extra; k-diffusion itself is
# installed with --no-deps (.ci/run, README).

def load_k_diffusion_sampling() -> types.ModuleType:
    found = importlib.util.find_spec("k_diffusion")
    if found is None:
        pytest.fail("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    package, utils = types.ModuleType("k_diffusion"), types.ModuleType("k_diffusion.utils")
    package.__path__, package.utils = [], utils
    utils.append_dims = lambda x, ndim: x.reshape(*x.shape, *[1] * (ndim - x.ndim))
    saved = {name: sys.modules.pop(name, None) for name in ("k_diffusion", "k_diffusion.utils")}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        path = os.path.join(found.submodule_search_locations[0], "sampling.py")
        spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            sys.modules.pop(name)
            if old is not None:
                sys.modules[name] = old
    return module


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion_sampling()


class ChurnNoise:
    """Stands in for k-diffusion's `torch` in its churn samplers (euler, heun, dpm_2), which draw
    eps = torch.randn_like(x) from the global generator on every step and use it only where gamma > 0:
    hands them sd's draws on the steps sd churns, and zeros (unused there) on the others."""

    def __init__(self, churned: list[bool], generator):
        self.churned, self.generator = list(churned), generator

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator) if self.churned.pop(0) else torch.zeros_like(x)

    def __getattr__(self, name):
        return getattr(torch, name)


def run_k_diffusion(kd, monkeypatch, sampler, options, den, x, sigmas, seed):
    fn = getattr(kd, "sample_" + {"euler_a": "euler_ancestral"}.get(sampler, sampler))
    g = torch.Generator("cpu").manual_seed(seed)
    extra = {}
    if "noise_sampler" in inspect.signature(fn).parameters:
        extra["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x.shape, generator=g)
    if "s_churn" in inspect.signature(fn).parameters:
        lo, hi = options.get("s_tmin", 0.0), options.get("s_tmax", float("inf"))
        churned = [options.get("s_churn", 0.0) > 0 and lo <= s <= hi for s in sigmas[:-1]]
        monkeypatch.setattr(kd, "torch", ChurnNoise(churned, g))
    return fn(den, x, sigmas, disable=True, **extra, **options)


KD_CASES = [("euler", {}), ("euler", {"s_churn": 1.0}), ("euler", {"s_churn": 4.0, "s_tmin": 0.3, "s_tmax": 3.0,
                                                                    "s_noise": 1.003}),
            ("euler_a", {}), ("euler_a", {"eta": 0.5, "s_noise": 0.9}),
            ("heun", {}), ("heun", {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 8.0}),
            ("dpm_2", {}), ("dpm_2", {"s_churn": 1.0, "s_noise": 0.95}),
            ("dpm_2_ancestral", {}), ("dpm_2_ancestral", {"eta": 0.6, "s_noise": 1.05}),
            ("lms", {}), ("lms", {"order": 2}),
            ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.3, "s_noise": 1.1}),
            ("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.7, "s_noise": 0.9, "r": 0.3}),
            ("dpmpp_2m", {}),
            ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_2m_sde", {"eta": 0.0}),
            ("dpmpp_2m_sde", {"eta": 0.5, "s_noise": 1.1, "solver_type": "heun"}),
            ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.8}), ("dpmpp_3m_sde", {"eta": 0.0})]
# Karras sigmas as k-diffusion users run them, and a twin family's own; n = 1 is left out because
# k-diffusion's 2M / 3M SDE fail on it (h_last is read before it is set when the first step lands on 0).
KD_SCHEDULES = [("karras", "euler"), ("default", "euler"), ("default", "dpm")]
KD_STEPS = (2, 3, 5, 10, 25)


def check_k_diffusion(kd, monkeypatch, sampler, options, prediction_type, schedule, family, n, fn=None):
    cfg = sd15(prediction_type=prediction_type)
    sched = make_schedule({"euler": "euler", "dpm": "dpmpp_2m"}[family], cfg, n, schedule)
    den = Denoiser(FakeUNet(prediction_type), sched, train_sigmas(cfg), prediction_type)
    x = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0)) * sched.noise_scale
    g = torch.Generator("cpu").manual_seed(1)
    ours = (fn or SAMPLERS[sampler].fn)(den, x, sched.sigmas, generator=g, **SAMPLERS[sampler].check_options(options))
    with monkeypatch.context() as patch:
        ref = run_k_diffusion(kd, patch, sampler, options, den, x, sched.sigmas, seed=1)
    assert torch.isfinite(ref).all()
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL_FRACTION * scale,
                               msg=lambda m: f"{sampler} {options} {prediction_type} {schedule} n={n}: {m}")
    key = "k-diffusion " + case_id(sampler, options)
    WORST[key] = max(WORST.get(key, 0.0), (ours - ref).abs().max().item() / scale)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,options", KD_CASES, ids=[case_id(*c) for c in KD_CASES])
def test_k_diffusion(kd, monkeypatch, sampler, options, prediction_type):
    """Within float32 rounding of k-diffusion's sample_<name> (most: bit for bit)."""
    for schedule, family in KD_SCHEDULES if SLOW else KD_SCHEDULES[:2]:
        for n in KD_STEPS:
            check_k_diffusion(kd, monkeypatch, sampler, options, prediction_type, schedule, family, n)


def test_k_diffusion_loads_without_its_training_stack(kd):
    """Only sampling.py was run, from the installed package, and nothing was left in sys.modules."""
    assert kd.__file__.endswith(os.path.join("k_diffusion", "sampling.py"))
    assert "k_diffusion" not in sys.modules and "k_diffusion.utils" not in sys.modules


# --- a wrong coefficient fails ----------------------------------------------------------
# Each entry changes one coefficient (or exponent, or sign) in one function of sd/samplers.py, by
# its source text, and the parity check against the reference must then fail. dpmpp_3m_sde's
# entry is the sign diffusers' third-order SDE-DPM-Solver++ update has on its D2 term's 0.5.

MUTATIONS = [  # (function, its text, the wrong text, sampler, its options, the reference)
    ("churn", "(sigma_hat ** 2 - sigma ** 2) ** 0.5", "(sigma_hat ** 2 - sigma ** 2) ** 0.51", "euler",
     {"s_churn": 1.0}, "k-diffusion"),
    ("churn", "min(s_churn / n, 2 ** 0.5 - 1)", "min(s_churn / (n + 1), 2 ** 0.5 - 1)", "heun",
     {"s_churn": 1.0}, "k-diffusion"),
    ("ancestral_step", "eta * (s_next ** 2", "1.01 * eta * (s_next ** 2", "dpm_2_ancestral", {}, "diffusers"),
    ("sample_heun", "(d + d_2) / 2", "(d + d_2) / 2.01", "heun", {}, "diffusers"),
    ("sample_dpm_2", "lerp(sigmas[i + 1].log(), 0.5)", "lerp(sigmas[i + 1].log(), 0.51)", "dpm_2", {}, "diffusers"),
    ("sample_dpm_2_ancestral", "lerp(sigma_down.log(), 0.5)", "lerp(sigma_down.log(), 0.51)", "dpm_2_ancestral",
     {}, "diffusers"),
    ("lagrange_integrals", "np.prod(nodes[j] - others)", "np.prod(nodes[j] - others) * 1.001", "lms", {},
     "diffusers"),
    ("sample_ddpm", "callback=callback)", "callback=callback, eta=0.99)", "ddpm", {}, "diffusers"),
    ("sample_dpmpp_2s_ancestral", "(s.log() - h / 2)", "(s.log() - h / 2.02)", "dpmpp_2s_ancestral", {},
     "k-diffusion"),
    ("sample_dpmpp_sde", "(1 - 1 / (2 * r))", "(1 - 1 / (2.02 * r))", "dpmpp_sde", {}, "k-diffusion"),
    ("sample_dpmpp_2m_sde", "x - 0.5 * torch.expm1", "x - 0.51 * torch.expm1", "dpmpp_2m_sde", {}, "diffusers"),
    ("sample_dpmpp_2m_sde", "/ (h + eta_h) + 1)", "/ (h + eta_h) + 1.01)", "dpmpp_2m_sde",
     {"solver_type": "heun"}, "diffusers"),
    ("sample_dpmpp_3m_sde", "(phi_2 / h_eta - 0.5)", "(phi_2 / h_eta + 0.5)", "dpmpp_3m_sde", {}, "k-diffusion"),
    ("unipc_update", "rhos = [0.5] if order == 2", "rhos = [0.51] if order == 2", "unipc", {}, "diffusers"),
    ("unipc_update", "rhos = [0.5] if order == 1", "rhos = [0.51] if order == 1", "unipc", {}, "diffusers"),
    ("unipc_update", "h_phi_k / hh - 1 / factorial", "h_phi_k / hh - 1.01 / factorial", "unipc", {"order": 3},
     "diffusers"),
    ("lagrange_integrals", "(-1) ** m", "(-1.01) ** m", "deis", {}, "diffusers"),
    ("sample_deis", "if n < 15", "if n < 5", "deis", {}, "diffusers"),
]


def mutated(name: str, right: str, wrong: str):
    """sd.samplers.<name> with `right` replaced by `wrong` in its source (decorators dropped)."""
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(getattr(samplers, name))))
    assert source.count(right) == 1, (name, right)
    namespace = dict(vars(samplers))
    exec(source[source.index("def "):].replace(right, wrong), namespace)
    return namespace[name]


@pytest.mark.parametrize("name,right,wrong,sampler,options,reference", MUTATIONS,
                         ids=[f"{m[0]}:{m[3]}{''.join(f'-{k}' for k in m[4])}" for m in MUTATIONS])
def test_a_wrong_coefficient_fails(kd, monkeypatch, name, right, wrong, sampler, options, reference):
    fn = mutated(name, right, wrong)
    monkeypatch.setattr(samplers, name, fn)  # the samplers look their helpers up in the module
    own = fn if SAMPLERS[sampler].fn.__name__ == name else None
    with pytest.raises(AssertionError):
        if reference == "diffusers":
            check(sampler, sd15(), 10, options=options, fn=own)
        else:
            check_k_diffusion(kd, monkeypatch, sampler, options, "epsilon", "karras", "euler", 10, fn=own)


def run_diffusers_3m_sde(cfg, n):
    """DPMSolverMultistepScheduler's third-order sde-dpmsolver++, with "heun" second-order warm-up
    steps (k-diffusion's 3M SDE steps up to third order through the same 2nd-order form)."""
    twin = diffusers_scheduler("dpmpp_2m_sde", cfg, solver_type="heun", order=3)
    twin.set_timesteps(n)
    g, unet = torch.Generator("cpu").manual_seed(0), FakeUNet(cfg.prediction_type)
    latents = torch.randn(SHAPE, generator=g)
    for t in twin.timesteps:
        latents = twin.step(unet(latents, t), t, latents, generator=g).prev_sample
    return latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_3m_sde_is_diffusers_third_order_sde_but_one_sign(prediction_type):
    """dpmpp_3m_sde has no twin, because diffusers' third-order sde-dpmsolver++ update adds its D2
    term with (1 - e^-2h - 2h) / (2h)^2 - 1/2 where k-diffusion (and the pattern of diffusers' own ODE
    update) has + 1/2, which leaves that term O(1) instead of O(h). With that one sign flipped in
    sd's sampler, the two agree to float32 rounding; as it is, they don't. (From 15 steps on, where
    diffusers does not lower the order of its last steps.)"""
    flipped = mutated("sample_dpmpp_3m_sde", "(phi_2 / h_eta - 0.5)", "(phi_2 / h_eta + 0.5)")
    for n in (15, 25):
        cfg = sd15(prediction_type=prediction_type)
        ref = run_diffusers_3m_sde(cfg, n)
        tolerance = dict(rtol=RTOL, atol=ATOL_FRACTION * ref.abs().max().item())
        torch.testing.assert_close(run_sd("dpmpp_3m_sde", cfg, n, fn=flipped)[0], ref, **tolerance)
        assert not torch.allclose(run_sd("dpmpp_3m_sde", cfg, n)[0], ref, **tolerance)


# --- the registry ------------------------------------------------------------------------

def test_registry_names_the_twins_the_tests_use():
    """sd's registry (twin class, the settings that pick the sampler) and the tests' map agree, and
    a folder's scheduler config picks each sampler back (defaults.from_checkpoint)."""
    assert set(TWINS) == {name for name, spec in SAMPLERS.items() if spec.twin}
    for name, (cls, picks) in TWINS.items():
        assert (SAMPLERS[name].twin, SAMPLERS[name].twin_config) == (cls.__name__, picks), name
        assert twin_of(cls.__name__, picks) == name


def test_options_are_checked_by_name_and_value():
    assert SAMPLERS["euler"].options == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
    assert SAMPLERS["dpmpp_2m_sde"].options == {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}
    assert SAMPLERS["ddpm"].options == {} and SAMPLERS["ddim"].options == {}  # landing: schedule data
    ok = {"solver_type": "heun", "eta": 0, "s_noise": 1.5}
    assert SAMPLERS["dpmpp_2m_sde"].check_options(ok) == ok
    bad = [("dpmpp_2m_sde", {"solver_type": "rk4"}, "dpmpp_2m_sde's solver_type must be one of 'midpoint', 'heun'"),
           ("unipc", {"order": 4}, "unipc's order must be one of 1, 2, 3, got 4"),
           ("lms", {"order": 2.0}, "lms's order must be one of 1, 2, 3, 4, got 2.0"),
           ("euler", {"s_churn": "lots"}, "euler's s_churn must be a number, got 'lots'"),
           ("euler_a", {"eta": True}, "euler_a's eta must be a number"),
           ("dpmpp_sde", {"r": float("nan")}, "dpmpp_sde's r must be a number"),
           ("heun", {"eta": 1.0}, "heun takes no option 'eta' .it takes: s_churn, s_tmin, s_tmax, s_noise.")]
    for sampler, options, message in bad:
        with pytest.raises(InputError, match=f"sampler_options: {message}"):
            SAMPLERS[sampler].check_options(options)


def test_euler_churn_draws_only_where_it_churns():
    """Default options: no noise drawn at all (the generator is untouched, today's Euler exactly);
    with churn limited to [s_tmin, s_tmax], one draw per step in it."""
    cfg = sd15()
    sched = make_schedule("euler", cfg, 10)
    den = Denoiser(FakeUNet("epsilon"), sched, train_sigmas(cfg), "epsilon")
    x = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0))
    for options, draws in [({}, 0), ({"s_churn": 1.0, "s_tmin": 1.0, "s_tmax": 5.0},
                                     int(((sched.sigmas[:-1] >= 1) & (sched.sigmas[:-1] <= 5)).sum()))]:
        g = torch.Generator("cpu").manual_seed(5)
        SAMPLERS["euler"].fn(den, x, sched.sigmas, generator=g, **options)
        expected = torch.Generator("cpu").manual_seed(5)
        for _ in range(draws):
            torch.randn(SHAPE, generator=expected)
        assert 0 < draws < 10 or not options
        assert torch.equal(g.get_state(), expected.get_state()), options


def test_readme_sampler_table_is_the_registry():
    """README.md's table of samplers is sd.samplers.sampler_table(), so the docs follow the registry."""
    readme = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    start = readme.index(sampler_table().splitlines()[0])
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), readme[start:]))
    assert "\n".join(rows) == sampler_table()


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
    """Not a check: prints the largest relative difference seen per case (pytest -s), against
    diffusers or, for the "k-diffusion ..." entries, k-diffusion."""
    for k, v in sorted(WORST.items()):
        print(f"\n  {k:16s} max|ours - reference| / max|reference| = {v:.2e}", end="")
    assert all(math.isfinite(v) for v in WORST.values())
