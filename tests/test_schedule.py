"""sd.schedule against diffusers' schedulers built from the same settings.

diffusers is the oracle here: for each sampler we build the matching scheduler with every
setting passed explicitly (DESIGN.md pitfall: a scheduler built in memory remembers which
settings were defaults, and `from_config` then swaps in the class's own defaults), call
`set_timesteps(n)` and compare what `sd.schedule.make_schedule` returns:

- timesteps: exactly, as float32 (what the UNet is told);
- sigmas: rtol 1e-6 (a few float32 ulps: np.interp vs torch arithmetic; the training table
  and the Karras sigmas are asserted bit for bit at the bottom);
- noise_scale: diffusers' `init_noise_sigma`, expressed in sigma space.
"""

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from helpers import diffusers_scheduler, sd15
from sd.samplers import SAMPLERS
from sd.schedule import (
    ALIGN_YOUR_STEPS,
    SCHEDULES,
    ScheduleConfig,
    alphas_cumprod,
    beta_quantile,
    make_schedule,
    schedule_table,
    sigma_to_t,
    train_sigmas,
)

SPACINGS = ("leading", "trailing", "linspace")
BETAS = ("scaled_linear", "linear")
# 7 and 61: T % n != 0 (for "trailing", n = 61 even gives 62 timesteps, in both).
STEPS = (1, 2, 4, 7, 8, 20, 25, 50, 61)
# (sampler, schedule)
KINDS = [("ddim", "default"), ("euler", "default"), ("euler", "karras"), ("euler_a", "default"),
         ("dpmpp_2m", "default"), ("dpmpp_2m", "karras"), ("dpmpp_2m_karras", "default")]
KIND_IDS = [s + ("+" + k if k != "default" else "") for s, k in KINDS]


def pair(sampler, cfg, n, schedule="default"):
    ours = make_schedule(sampler, cfg, n, schedule)
    ref = diffusers_scheduler(sampler, cfg, schedule)
    ref.set_timesteps(n)
    return ours, ref


def ddim_sigma(ac: torch.Tensor, t) -> torch.Tensor:
    """sigma of DDIM's alpha_cumprod at integer timestep(s) t, float32."""
    a = ac[t]
    return ((1 - a) / a) ** 0.5


# --- the training schedule ------------------------------------------------------------

@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_alphas_cumprod(beta_schedule, cls):
    cfg = sd15(beta_schedule=beta_schedule)
    ref = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule)
    ours = alphas_cumprod(cfg)
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert torch.equal(ours, ref.alphas_cumprod)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_train_sigmas(beta_schedule):
    cfg = sd15(beta_schedule=beta_schedule)
    ac = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule).alphas_cumprod
    ours = train_sigmas(cfg)
    assert ours.dtype == np.float32 and ours.shape == (1000,)
    assert np.all(np.diff(ours) > 0), "ascending"
    np.testing.assert_array_equal(ours, ddim_sigma(ac, slice(None)).numpy())


def test_sigma_to_t_matches_diffusers():
    """sd.schedule.sigma_to_t (vectorised) vs EulerDiscreteScheduler._sigma_to_t (per sigma)."""
    cfg = sd15()
    ref = diffusers_scheduler("euler", cfg)
    table = train_sigmas(cfg)
    # Both sides interpolate the same table here, so the results must agree to the last bit.
    log_table = np.log(table)
    sig = np.concatenate([np.geomspace(1e-3, 30, 97), table[[0, 1, 500, 998, 999]].astype(np.float64)])
    ours = sigma_to_t(sig, table)
    theirs = np.array([ref._sigma_to_t(s, log_table) for s in sig])
    np.testing.assert_array_equal(ours, theirs)
    assert ours.min() == 0 and ours.max() == 999, "clamped to the table outside its range"


# --- timesteps --------------------------------------------------------------------------
# Step counts loop inside the tests (a parameter each would cost more in pytest than the checks).

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler,schedule", KINDS, ids=KIND_IDS)
def test_timesteps(sampler, schedule, spacing):
    for beta_schedule, n in itertools.product(BETAS, STEPS):
        cfg = sd15(timestep_spacing=spacing, beta_schedule=beta_schedule)
        ours, ref = pair(sampler, cfg, n, schedule)
        msg = f"{beta_schedule}, n={n}"
        assert ours.timesteps.dtype == torch.float32
        theirs = ref.timesteps.to(torch.float32)
        assert ours.timesteps.shape == theirs.shape, msg
        assert torch.equal(ours.timesteps, theirs), (msg, ours.timesteps, theirs)


def test_lightning_trailing_timesteps():
    """DESIGN.md: "trailing" spacing gives [999, 749, 499, 249] for 4 steps."""
    sched = make_schedule("euler", sd15(timestep_spacing="trailing"), 4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]


# --- sigmas -----------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler,schedule", [k for k in KINDS if k[0] != "ddim"],
                         ids=[i for i in KIND_IDS if i != "ddim"])
def test_sigmas_k_diffusion_family(sampler, schedule, spacing):
    """Euler, Euler ancestral and DPM-Solver++ keep `sigmas` (n+1, last 0) as sd does."""
    for beta_schedule, n in itertools.product(BETAS, STEPS):
        cfg = sd15(timestep_spacing=spacing, beta_schedule=beta_schedule)
        ours, ref = pair(sampler, cfg, n, schedule)
        msg = f"{beta_schedule}, n={n}"
        assert ours.sigmas.dtype == torch.float32
        assert ours.sigmas.shape == (len(ours.timesteps) + 1,), msg
        assert ours.sigmas[-1] == 0 and ref.sigmas[-1] == 0
        assert torch.all(ours.sigmas[:-1] > 0), msg
        torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0, msg=msg)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_sigmas_ddim(spacing, set_alpha_to_one):
    """DDIMScheduler has no sigmas: compare sigma = sqrt((1 - a) / a) at each timestep, and the
    final sigma: 0 with set_alpha_to_one, else sigma(t=0) (diffusers' final_alpha_cumprod).

    diffusers' last step lands on the final alpha only when t_last - T//n < 0: always for
    "leading" with n <= T/2 and "linspace", not for "trailing" with T % n != 0 (there it lands
    on t=0; that whole loop differs by design, test_ddim_landing_sigma_other_spacings) nor
    for "leading" with n > T/2 (there both land on t=0: test_ddim_landing_sigma_leading_many_steps)."""
    for beta_schedule, n in itertools.product(BETAS, STEPS):
        cfg = sd15(timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, beta_schedule=beta_schedule)
        ours, ref = pair("ddim", cfg, n)
        msg = f"{beta_schedule}, n={n}"
        assert ours.sigmas.shape == (len(ref.timesteps) + 1,), msg
        torch.testing.assert_close(ours.sigmas[:-1], ddim_sigma(ref.alphas_cumprod, ref.timesteps),
                                   rtol=1e-6, atol=0, msg=msg)
        if ref.timesteps[-1] - cfg.num_train_timesteps // n >= 0:
            assert spacing == "trailing" and cfg.num_train_timesteps % n != 0
            continue
        final = ((1 - ref.final_alpha_cumprod) / ref.final_alpha_cumprod) ** 0.5
        if set_alpha_to_one:
            assert ours.sigmas[-1] == 0 and final == 0
        else:
            torch.testing.assert_close(final, ddim_sigma(ref.alphas_cumprod, 0), rtol=1e-6, atol=0)
            torch.testing.assert_close(ours.sigmas[-1], final, rtol=1e-6, atol=0, msg=msg)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddim_landing_sigma_leading(set_alpha_to_one, steps_offset):
    """diffusers' DDIM step goes from t to t - T//n; sd's lands on the next scheduled timestep.
    With "leading" spacing (SD's) those are the same timestep, so the whole DDIM loop agrees."""
    cfg = sd15(timestep_spacing="leading", set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
    for n in STEPS + (500,):
        ours, ref = pair("ddim", cfg, n)
        ac, T = ref.alphas_cumprod, cfg.num_train_timesteps
        prev = ref.timesteps - T // n  # DDIMScheduler.step's prev_timestep
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], ref.final_alpha_cumprod)
        landing = ((1 - a_prev) / a_prev) ** 0.5
        torch.testing.assert_close(ours.sigmas[1:], landing, rtol=1e-6, atol=0, msg=f"n={n}")


def test_ddim_landing_sigma_leading_many_steps():
    """With steps_offset=1 and n > T/2, T//n == 1: the last step goes from t=1 to t=0 and lands
    on sigma(t=0) even with set_alpha_to_one."""
    cfg = sd15(timestep_spacing="leading", set_alpha_to_one=True, steps_offset=1)
    ours, ref = pair("ddim", cfg, 600)
    assert ref.timesteps[-1] == 1 and 1 - cfg.num_train_timesteps // 600 == 0
    torch.testing.assert_close(ours.sigmas[-1], ddim_sigma(ref.alphas_cumprod, 0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 25, 61])
def test_ddim_landing_sigma_other_spacings(spacing, n):
    """diffusers' DDIM lands each step on t - T//n (below 0: the final alpha) and starts the next
    from the next scheduled timestep. sd's Schedule.landing holds those landing sigmas whenever
    they differ from the next step's sigma ("linspace"; "trailing" unless n divides T)."""
    cfg = sd15(timestep_spacing=spacing)
    ours, ref = pair("ddim", cfg, n)
    ac, T = ref.alphas_cumprod, cfg.num_train_timesteps
    prev = ref.timesteps - T // n
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], ref.final_alpha_cumprod)
    landing = ((1 - a_prev) / a_prev) ** 0.5
    ts = ref.timesteps.tolist()
    same = all(t - T // n == t_next for t, t_next in zip(ts, ts[1:])) and ts[-1] - T // n < 0
    assert same == (n == 1 or (spacing == "trailing" and T % n == 0))
    assert (ours.landing is None) == same
    torch.testing.assert_close(ours.sigmas[1:] if same else ours.landing, landing, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_plms_schedule(spacing):
    """PLMS runs on DDIM's schedule. PNDMScheduler(skip_prk_steps=True) lists n + 1 timesteps,
    the second one twice (its Heun start evaluates there, then steps from there); sd's Schedule
    lists each once and sample_plms makes the extra call itself."""
    for n in STEPS:
        cfg = sd15(timestep_spacing=spacing)
        ours, ref = pair("plms", cfg, n)
        ddim = make_schedule("ddim", cfg, n)
        assert torch.equal(ours.timesteps, ddim.timesteps) and torch.equal(ours.sigmas, ddim.sigmas)
        assert (ours.noise_scale, ours.variance_preserving) == (ddim.noise_scale, ddim.variance_preserving)
        theirs = ref.timesteps.to(torch.float32)
        if len(ours.timesteps) > 1:
            assert theirs[1] == theirs[2]
            theirs = torch.cat([theirs[:2], theirs[3:]])
        assert torch.equal(ours.timesteps, theirs), n
        assert ref.init_noise_sigma == 1.0


# --- noise scale ------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler,schedule", KINDS, ids=KIND_IDS)
def test_noise_scale(sampler, schedule, spacing):
    for n in STEPS:
        cfg = sd15(timestep_spacing=spacing)
        ours, ref = pair(sampler, cfg, n, schedule)
        assert isinstance(ours.noise_scale, float)
        if sampler in ("euler", "euler_a"):
            # The Euler family keeps latents in sigma space, so this is init_noise_sigma itself:
            # sigma_max for linspace/trailing and sqrt(sigma_max^2 + 1) for leading (a diffusers
            # quirk sd reproduces). diffusers takes that sqrt in float32, sd in float64: 1e-6.
            assert not ours.variance_preserving
            init = float(ref.init_noise_sigma)
            if spacing == "leading":
                assert init == pytest.approx(math.sqrt(float(ref.sigmas.max()) ** 2 + 1), rel=1e-6)
            else:
                assert init == float(ref.sigmas.max())
            assert ours.noise_scale == pytest.approx(init, rel=1e-6, abs=0), n
        else:
            # DDIM / DPM-Solver keep latents variance preserving (init_noise_sigma = 1); in
            # sigma space the same noise is noise * sqrt(1 + sigma_max^2).
            assert ours.variance_preserving
            assert ref.init_noise_sigma == 1.0
            if sampler == "ddim":
                sigma_max = float(ddim_sigma(ref.alphas_cumprod, ref.timesteps[0]))
            else:
                sigma_max = float(ref.sigmas[0])
            assert ours.noise_scale == pytest.approx(math.sqrt(1 + sigma_max ** 2), rel=1e-6, abs=0), n


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_to_latents(set_alpha_to_one):
    """Sigma-space result -> diffusers' latents: only DDIM with a non-zero last sigma rescales."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(0))
    for sampler, schedule in KINDS:
        sched = make_schedule(sampler, sd15(set_alpha_to_one=set_alpha_to_one), 4, schedule)
        if sampler == "ddim" and not set_alpha_to_one:
            ac0 = alphas_cumprod(sd15())[0]
            torch.testing.assert_close(sched.to_latents(x), x * ac0 ** 0.5, rtol=1e-6, atol=0)
        else:
            assert torch.equal(sched.to_latents(x), x)


# --- configuration ----------------------------------------------------------------------

SD15_SCHEDULER_CONFIG = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def test_from_diffusers_picks_known_keys():
    cfg = ScheduleConfig.from_diffusers(SD15_SCHEDULER_CONFIG)
    assert cfg == sd15()
    cfg = ScheduleConfig.from_diffusers({"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                                         "use_karras_sigmas": True, "steps_offset": 0, "whatever": [1, 2]})
    assert (cfg.timestep_spacing, cfg.prediction_type, cfg.steps_offset) == ("trailing", "v_prediction", 0)
    assert cfg.beta_start == 0.00085 and cfg.beta_schedule == "scaled_linear"  # untouched: defaults
    assert ScheduleConfig.from_diffusers({}) == ScheduleConfig()


@pytest.mark.parametrize("sampler,schedule", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_from_diffusers_scheduler_config_roundtrip(sampler, schedule, spacing):
    """A diffusers scheduler's own (complete) config read back gives the same schedule."""
    ref = diffusers_scheduler(sampler, sd15(timestep_spacing=spacing), schedule)
    cfg = ScheduleConfig.from_diffusers(dict(ref.config))
    ref.set_timesteps(20)
    ours = make_schedule(sampler, cfg, 20, schedule)
    torch.testing.assert_close(ours.timesteps, ref.timesteps.to(torch.float32), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bad_settings_name_the_field(sampler):
    if sampler != "lcm":  # LCM's timesteps come from original_inference_steps, whatever the spacing
        with pytest.raises(ValueError, match="timestep_spacing"):
            make_schedule(sampler, sd15(timestep_spacing="middle"), 4)
    with pytest.raises(ValueError, match="beta_schedule"):
        make_schedule(sampler, sd15(beta_schedule="cosine"), 4)
    for n in (0, -1):
        with pytest.raises(ValueError, match="num_steps"):
            make_schedule(sampler, sd15(), n)


def test_unknown_sampler_names_the_field():
    with pytest.raises(ValueError, match="sampler: 'no_such_sampler' is not one of"):
        make_schedule("no_such_sampler", sd15(), 4)


# --- bit-for-bit: the training table and Karras sigmas -----------------------------------

def test_train_sigmas_bitwise():
    """torch's CPU pow(x, 0.5) differs from numpy's sqrt by one ulp at 6 of 1000 entries:
    sd computes the table in torch, as diffusers does."""
    cfg = sd15()
    ac = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    np.testing.assert_array_equal(train_sigmas(cfg), (((1 - ac) / ac) ** 0.5).numpy())


def test_euler_karras_timesteps_bitwise():
    ours, ref = pair("euler", sd15(timestep_spacing="leading"), 20, "karras")
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_dpm_karras_sigmas_bitwise():
    """Karras sigmas computed from Python floats (float64), as diffusers does."""
    ours, ref = pair("dpmpp_2m_karras", sd15(), 20)
    assert torch.equal(ours.timesteps, ref.timesteps.to(torch.float32))
    assert torch.equal(ours.sigmas, ref.sigmas)


# --- the twins added with the sampler lab, on their own schedules and diffusers' flags ----------
# Heun and KDPM2 list each timestep / sigma of a second-order step twice (KDPM2 interleaves its
# midpoints' timesteps); DDPM keeps no sigmas (sigma of alphas_cumprod at each timestep, final 0).
# sd's Schedule lists each step once.

TWIN_KINDS = [(s, f) for s in ("heun", "dpm_2", "dpm_2_ancestral", "lms", "ddpm", "dpmpp_2m_sde", "unipc", "deis")
              for f in ("default", "karras", "exponential", "beta") if s != "ddpm" or f == "default"]
TWIN_KINDS += [("euler", "exponential"), ("euler", "beta"), ("dpmpp_2m", "exponential"), ("dpmpp_2m", "beta")]
EULER_LIKE = ("euler", "heun", "dpm_2", "dpm_2_ancestral", "lms")


def twin_steps(sampler: str, ref) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of a diffusers scheduler after set_timesteps, one entry per step."""
    t = ref.timesteps.to(torch.float32)
    if sampler == "ddpm":
        return t, torch.cat([ddim_sigma(ref.alphas_cumprod, ref.timesteps), torch.zeros(1)])
    if sampler == "heun":
        return torch.cat([t[:1], t[1::2]]), torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
    if sampler in ("dpm_2", "dpm_2_ancestral"):
        return t[::2], torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2]])
    return t, ref.sigmas


KDPM2 = ("dpm_2", "dpm_2_ancestral")
SLOW = bool(os.environ.get("SD_SLOW_TESTS"))


@pytest.mark.parametrize("sampler,schedule", TWIN_KINDS, ids=[f"{s}+{f}" for s, f in TWIN_KINDS])
def test_twin_timesteps_sigmas_and_noise(sampler, schedule):
    """Timesteps exactly; sigmas to rtol 1e-6 (the beta flag's: 1e-6 relative to sigma_max, where
    float32 rounding of the quantile sum leaves the smallest at ~3e-7 absolute); the starting
    noise as diffusers' init_noise_sigma, in sigma space. KDPM2's constructor takes 0.3 s: by
    default each of its kinds runs one (spacing, betas) pair, the kinds taking turns (SD_SLOW_TESTS=1:
    all). DEIS's flags in one step: test_samplers.py::test_deis_flag_in_one_step."""
    configs = list(itertools.product(SPACINGS, BETAS))
    if sampler in KDPM2 and not SLOW:
        configs = [configs[TWIN_KINDS.index((sampler, schedule)) % len(configs)]]
    for spacing, beta_schedule in configs:
        cfg = sd15(timestep_spacing=spacing, beta_schedule=beta_schedule)
        ref = diffusers_scheduler(sampler, cfg, schedule)
        for n in STEPS if sampler != "deis" or schedule == "default" else STEPS[1:]:
            ours = make_schedule(sampler, cfg, n, schedule)
            ref.set_timesteps(n)
            timesteps, sigmas = twin_steps(sampler, ref)
            msg = f"{spacing}, {beta_schedule}, n={n}"
            assert torch.equal(ours.timesteps, timesteps), (msg, ours.timesteps, timesteps)
            torch.testing.assert_close(ours.sigmas, sigmas.to(torch.float32), rtol=1e-6,
                                       atol=1e-6 * float(sigmas[0]) if schedule == "beta" else 0, msg=msg)
            if sampler in EULER_LIKE:
                assert not ours.variance_preserving
                assert ours.noise_scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), msg
            else:
                assert ours.variance_preserving and ref.init_noise_sigma == 1.0
                assert ours.noise_scale == pytest.approx(math.sqrt(1 + float(sigmas[0]) ** 2), rel=1e-6), msg


def test_deis_ends_at_sigma_min():
    """DEIS's runs end at sigma(t=0), diffusers' DEIS default (it has no final_sigmas_type), on every
    schedule; Schedule.to_latents then brings the result back to diffusers' variance-preserving scale."""
    cfg = sd15()
    sigma_min = float(train_sigmas(cfg)[0])
    for schedule in SCHEDULES:
        sched = make_schedule("deis", cfg, 8, schedule)
        assert float(sched.sigmas[-1]) == pytest.approx(sigma_min, rel=1e-6), schedule
        x = torch.ones(1)
        torch.testing.assert_close(sched.to_latents(x), x / (1 + sched.sigmas[-1] ** 2) ** 0.5)


# --- the schedules without a diffusers flag: ComfyUI's and NVIDIA's definitions ---------------
# No package ships ComfyUI's schedulers, so its definitions (comfy/samplers.py: simple_scheduler,
# ddim_scheduler, normal_scheduler(sgm=True); comfy_extras/nodes_align_your_steps.py) are written
# out below loop by loop, on the model's training sigmas, and sd's vectorised ones must agree.

def comfy_simple(table, n):
    stride = len(table) / n
    return [float(table[-(1 + int(x * stride))]) for x in range(n)] + [0.0]


def comfy_ddim_uniform(table, n):
    sigs, x, stride = [0.0], 1, max(len(table) // n, 1)
    while x < len(table):
        sigs.append(float(table[x]))
        x += stride
    return sigs[::-1]


def comfy_sgm_uniform(table, n):
    log_table = torch.from_numpy(np.log(table))
    start, end = int(np.abs(np.log(table[-1]) - np.log(table)).argmin()), 0  # timestep(sigma_max), (sigma_min)
    sigs = []
    for t in torch.linspace(start, end, n + 1)[:-1]:
        low, high, w = int(t.floor()), int(t.ceil()), float(t.frac())
        sigs.append(float(((1 - w) * log_table[low] + w * log_table[high]).exp()))
    return sigs + [0.0]


def ays_loglinear(levels, count):
    xs, ys = np.linspace(0, 1, len(levels)), np.log(levels[::-1])
    return np.exp(np.interp(np.linspace(0, 1, count), xs, ys))[::-1]


@pytest.mark.parametrize("schedule,reference", [("simple", comfy_simple), ("ddim_uniform", comfy_ddim_uniform),
                                                ("sgm_uniform", comfy_sgm_uniform)])
def test_comfyui_schedules(schedule, reference):
    for beta_schedule, n in itertools.product(BETAS, STEPS + (3, 6, 13, 999, 1000)):
        cfg = sd15(beta_schedule=beta_schedule)
        expected = torch.tensor(reference(train_sigmas(cfg), n), dtype=torch.float32)
        for sampler in ("euler", "dpmpp_2m"):  # the same sigmas whatever the sampler's family
            ours = make_schedule(sampler, cfg, n, schedule)
            torch.testing.assert_close(ours.sigmas, expected, rtol=1e-6, atol=0, msg=f"{sampler} n={n}")
            assert len(ours.timesteps) == len(ours.sigmas) - 1
    # ComfyUI's ddim_uniform steps every T//n-th training sigma up from t = 1: n + 1 steps for n = 7.
    assert len(make_schedule("euler", sd15(), 7, "ddim_uniform").timesteps) == 8


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_align_your_steps(model):
    """NVIDIA's list as published for 10 steps; other counts interpolate it log-linearly to n + 1
    levels (the last, where the run ends, set to 0); n = 20 keeps every published level."""
    published = np.array(ALIGN_YOUR_STEPS[model])
    assert published[0] == pytest.approx(float(train_sigmas(sd15())[-1]), rel=1e-6)  # sigma_max of SD's table
    for n in (1, 2, 4, 7, 10, 20, 25, 50):
        ours = make_schedule("euler", sd15(), n, "align_your_steps", model=model).sigmas
        levels = published if n == 10 else ays_loglinear(published, n + 1)
        expected = torch.tensor(np.concatenate([levels[:-1], [0.0]]), dtype=torch.float32)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0, msg=f"n={n}")
        if n == 20:
            torch.testing.assert_close(ours[:-1:2], torch.tensor(published[:-1], dtype=torch.float32))


def test_beta_quantile_matches_scipy():
    """sd's own inverse of the regularized incomplete beta function, against scipy.stats.beta.ppf
    (what diffusers' use_beta_sigmas calls) to 1e-13 relative on the nearer tail; far in the lower
    tail, where scipy's root finder gives up (it warns), against its forward function: I_x(a, b) = p."""
    from scipy.special import betainc
    from scipy.stats import beta

    for a, b in [(0.6, 0.6), (0.5, 2.0), (2.0, 3.0), (0.3, 0.9), (1.0, 1.0), (5.0, 0.7)]:
        for p in np.linspace(0, 1, 401):
            ours, ref = beta_quantile(float(p), a, b), float(beta.ppf(p, a, b))
            assert abs(ours - ref) <= 1e-13 * min(ref, 1 - ref) + 1e-300, (a, b, p, ours, ref)
        for p in (1e-12, 1e-9, 1e-6):  # (the upper tail is this one of Beta(b, a), by symmetry)
            assert betainc(a, b, beta_quantile(p, a, b)) == pytest.approx(p, rel=1e-12)


def test_schedules_on_explicit_steps_are_descending():
    """Every schedule on every sampler family: descending sigmas, the UNet told a timestep for each."""
    for (name, spec), schedule in itertools.product(SAMPLERS.items(), SCHEDULES):
        for n in (1, 5, 30):
            sched = make_schedule(name, sd15(), n, schedule)
            assert torch.all(sched.sigmas[:-1] > sched.sigmas[1:]) or spec.timesteps == "deis", (name, schedule)
            assert torch.all(sched.sigmas[:-1] >= sched.sigmas[1:]) and sched.sigmas[-1] >= 0
            assert len(sched.timesteps) == len(sched.sigmas) - 1 and torch.all(sched.timesteps >= 0)


def test_readme_schedule_table_is_the_registry():
    readme = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    start = readme.index(schedule_table().splitlines()[0])
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), readme[start:]))
    assert "\n".join(rows) == schedule_table()
