"""Noise schedules: DDPM betas -> alphas_cumprod -> sigmas, and the sigmas a sampling run visits.

Samplers work in k-diffusion's variance-exploding form, x = x0 + sigma * eps with
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod).

A run's sigmas come from two choices:
- the *timesteps* of a sampler's diffusers twin (TIMESTEPS: "euler", "kdpm2", "dpm", "deis",
  "ddim", "ddpm", "lcm"):
  how that family of schedulers spaces its steps (Lin et al. 2023, Table 2, names the
  spacings), which timestep it tells the UNet for each sigma, and where it starts;
- the *schedule* (SCHEDULES): "default" keeps the twin's own sigmas; the others respace them
  ("karras", "exponential", "beta" as diffusers' use_*_sigmas flags; "sgm_uniform", "simple",
  "ddim_uniform" as ComfyUI; "align_your_steps", NVIDIA's published lists).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from .errors import InputError
from .samplers import resolve


@dataclass(frozen=True)
class ScheduleConfig:
    """The training schedule plus how inference spaces its steps; SD 1.5's values by default."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"       # "epsilon", "v_prediction" or "sample"
    timestep_spacing: str = "leading"      # "leading", "trailing" or "linspace"
    steps_offset: int = 1
    set_alpha_to_one: bool = False         # DDIM: end at sigma 0 rather than at sigma(t=0)
    original_inference_steps: int = 50     # LCM: the distillation schedule its steps are picked from
    timestep_scaling: float = 10.0         # LCM: scales t in the c_skip / c_out boundary condition

    @classmethod
    def from_diffusers(cls, config: dict) -> "ScheduleConfig":
        """Take the fields we know from a diffusers scheduler_config.json; ignore the rest."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule: {cfg.beta_schedule!r} is not supported (use 'scaled_linear' or 'linear')")
    return torch.cumprod(1.0 - betas, dim=0)


def train_sigmas(cfg: ScheduleConfig) -> np.ndarray:
    """(T,) float32 sigma of every training timestep, ascending."""
    ac = alphas_cumprod(cfg)
    return (((1 - ac) / ac) ** 0.5).numpy()  # in torch, as diffusers: numpy's power can differ in the last bit


def sigma_to_t(sigma: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma by interpolating log-sigma (k-diffusion, diffusers)."""
    log_table = np.log(table)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_table[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def spaced_timesteps(cfg: ScheduleConfig, n: int, integer: bool) -> np.ndarray:
    """n timesteps, descending. `integer=False` keeps linspace's fractional steps (Euler)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n, dtype=np.float64 if integer else np.float32)[::-1]
        return t.round() if integer else t
    if cfg.timestep_spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1] + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"timestep_spacing: {cfg.timestep_spacing!r} is not one of 'leading', 'trailing', 'linspace'")


@dataclass
class Schedule:
    """What one sampling run visits.

    timesteps: (n,) what the UNet is told at each step.
    sigmas: (n+1,) the noise level at each step, then where the last step lands.
    noise_scale: multiplies unit noise to start txt2img (diffusers' init_noise_sigma,
        expressed in sigma space).
    variance_preserving: whether diffusers' scheduler of this kind keeps latents as
        x / sqrt(1 + sigma^2); only matters when the last sigma is not zero.
    """
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    noise_scale: float
    variance_preserving: bool
    landing: torch.Tensor | None = None  # DDIM only, see ddim_schedule

    def from_step(self, start: int) -> "Schedule":
        """The schedule from step `start` on: img2img and inpainting with strength < 1 skip the
        noisiest steps and start from the image noised to sigmas[start]."""
        landing = self.landing[start:] if self.landing is not None else None
        return Schedule(self.timesteps[start:], self.sigmas[start:], self.noise_scale,
                        self.variance_preserving, landing)

    def to_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler output (sigma space) -> latents as diffusers' scheduler would return them."""
        last = float(self.sigmas[-1])
        return x / (1 + last ** 2) ** 0.5 if self.variance_preserving else x


def _schedule(timesteps, sigmas, last_sigma, noise_scale, vp):
    sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
    return Schedule(torch.from_numpy(np.asarray(timesteps, dtype=np.float32).copy()),
                    torch.from_numpy(sigmas), float(noise_scale), vp)


# ---------------------------------------------------------------- schedules: how n sigmas are spread


@dataclass(frozen=True)
class SigmaRange:
    """What a schedule spreads its sigmas over."""
    table: np.ndarray   # the model's training sigmas, ascending
    low: float          # the span diffusers' use_*_sigmas flags convert, for this sampler's twin
    high: float
    model: str          # "sd15" or "sdxl": Align Your Steps publishes a list for each


SCHEDULES: dict[str, Callable[[int, SigmaRange], np.ndarray] | None] = {"default": None}


def schedule(name: str):
    """Register `fn(n, SigmaRange) -> n descending sigmas` as a schedule (ComfyUI's ddim_uniform can
    give one more). The run then ends at 0, or at the span's sigma_min for DEIS."""
    def add(fn):
        SCHEDULES[name] = fn
        return fn
    return add


@schedule("karras")
def karras_sigmas(n: int, r: SigmaRange, rho: float = 7.0) -> np.ndarray:
    """Steps evenly spaced in sigma^(1/7) (Karras et al. 2022, eq. 5; diffusers' use_karras_sigmas)."""
    ramp = np.linspace(0, 1, n)
    low, high = float(r.low), float(r.high)  # float64 math, as diffusers
    return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho


@schedule("exponential")
def exponential_sigmas(n: int, r: SigmaRange) -> np.ndarray:
    """Steps evenly spaced in log(sigma) (k-diffusion; diffusers' use_exponential_sigmas)."""
    return np.exp(np.linspace(math.log(r.high), math.log(r.low), n))


@schedule("beta")
def beta_sigmas(n: int, r: SigmaRange, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Steps at Beta(0.6, 0.6) quantiles, crowded at both ends (Lee et al. 2024; diffusers' use_beta_sigmas).
    sigma_min + (sigma_max - sigma_min) times the quantiles of evenly spaced levels."""
    low, high = float(r.low), float(r.high)
    return np.array([low + beta_quantile(p, a, b) * (high - low) for p in 1 - np.linspace(0, 1, n)])


@schedule("sgm_uniform")
def sgm_uniform_sigmas(n: int, r: SigmaRange) -> np.ndarray:
    """Timesteps evenly spaced from T - 1 towards 0, the last left out (Stability's sgm; ComfyUI's sgm_uniform).
    Sigmas between training steps by log-linear interpolation."""
    t = torch.linspace(len(r.table) - 1, 0, n + 1)[:-1].double().numpy()
    return t_to_sigma(t, r.table)


@schedule("simple")
def simple_sigmas(n: int, r: SigmaRange) -> np.ndarray:
    """Every (T / n)-th training sigma from the top, indices truncated (ComfyUI's simple)."""
    stride = len(r.table) / n
    return np.array([r.table[-(1 + int(k * stride))] for k in range(n)], dtype=np.float64)


@schedule("ddim_uniform")
def ddim_uniform_sigmas(n: int, r: SigmaRange) -> np.ndarray:
    """The training sigmas at t = 1, 1 + T//n, 1 + 2 T//n, ... below T (ComfyUI's ddim_uniform).
    Noisiest first. As there, that is one step more than n when T//n fits n + 1 times (n = 6, 7, ...)."""
    return r.table[1::max(len(r.table) // n, 1)][::-1].astype(np.float64)


# NVIDIA's published 10-step sigmas (Sabour et al. 2024, "Align Your Steps"; the last one is where
# the run ends, 0 in practice), for SD 1.5 and SDXL.
ALIGN_YOUR_STEPS = {
    "sd15": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
}


@schedule("align_your_steps")
def align_your_steps_sigmas(n: int, r: SigmaRange) -> np.ndarray:
    """NVIDIA's optimised 10-step sigmas for SD 1.5 / SDXL (Sabour et al. 2024, Align Your Steps).
    Other step counts log-linearly interpolate them to n + 1 levels (their recipe, as ComfyUI's node)."""
    levels = np.array(ALIGN_YOUR_STEPS[r.model])
    if n + 1 != len(levels):
        where = np.linspace(0, 1, n + 1)
        levels = np.exp(np.interp(where, np.linspace(0, 1, len(levels)), np.log(levels[::-1])))[::-1]
    return levels[:-1]


def schedule_table() -> str:
    """The README's table of schedules (markdown), from SCHEDULES: one row each."""
    rows = ["| `schedule=` | sigmas |", "| --- | --- |",
            "| `default` | the sampler's diffusers twin's own, on the model's timestep spacing |"]
    rows += [f"| `{name}` | {fn.__doc__.strip().splitlines()[0]} |" for name, fn in SCHEDULES.items() if fn]
    return "\n".join(rows)


def t_to_sigma(t: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Sigma at fractional timesteps, interpolating log-sigma between the training steps."""
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    log_table = np.log(table.astype(np.float64))
    return np.exp((1 - (t - low)) * log_table[low] + (t - low) * log_table[high])


def beta_quantile(p: float, a: float, b: float) -> float:
    """The inverse of the regularized incomplete beta function I_x(a, b) (the Beta(a, b) quantile),
    to float64 precision: Newton's method kept inside a bisection bracket, on the tail p <= 1/2
    (the other by symmetry) from the tail's leading term x^a / (a B(a, b))."""
    if p <= 0 or p >= 1:
        return float(p > 0)
    if p > 0.5:
        return 1 - beta_quantile(1 - p, b, a)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi = 0.0, 1.0
    x = min(0.5, math.exp((math.log(p * a) + log_beta) / a))
    for _ in range(300):
        f = incomplete_beta(x, a, b) - p
        if f == 0:
            break
        lo, hi = (x, hi) if f < 0 else (lo, x)
        density = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)
        x_next = x - f / density
        if not lo < x_next < hi:
            x_next = (lo + hi) / 2
        if abs(x_next - x) <= 1e-16 * x:
            return x_next
        x = x_next
    return x


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz),
    on the side of x where it converges fast (Press et al., Numerical Recipes, section 6.4)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(1 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return front * f


# ---------------------------------------------------------------- timesteps: each twin family's own


@dataclass(frozen=True)
class Timesteps:
    """One family of diffusers schedulers: its own schedule, the span its flags convert, how it
    tells the UNet the timestep of a sigma it did not start from (None: fractional), and whether
    a respaced run ends at the span's sigma_min rather than at 0."""
    default: Callable[[ScheduleConfig, int], Schedule]
    span: Callable[[ScheduleConfig, int, np.ndarray], tuple[float, float]]
    timestep_rule: Callable[[np.ndarray, str], np.ndarray] | None
    variance_preserving: bool
    ends_at_sigma_min: bool = False


def ddim_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """DDIMScheduler's and PNDMScheduler's timesteps.

    diffusers steps from t to t - T//n (past t=0: the final alpha), then starts the next step
    from the next scheduled timestep. For "leading" spacing, SD's, those are the same point;
    for the others, `landing` holds where each DDIM step really lands (PLMS ignores it)."""
    table = train_sigmas(cfg)
    t = spaced_timesteps(cfg, n, integer=True).astype(np.int64)
    final = 0.0 if cfg.set_alpha_to_one else table[0]
    prev = t - cfg.num_train_timesteps // n
    landing = np.array([table[p] if p >= 0 else final for p in prev], dtype=np.float32)
    schedule = _schedule(t, table[t], landing[-1], (1 + table[t[0]] ** 2) ** 0.5, vp=True)
    if not np.array_equal(landing, schedule.sigmas[1:].numpy()):
        schedule.landing = torch.from_numpy(landing)
    return schedule


def euler_noise_scale(cfg: ScheduleConfig, top: float) -> float:
    """EulerDiscreteScheduler's init_noise_sigma: sigma_max, or sqrt(sigma_max^2 + 1) for
    "leading" spacing (a diffusers quirk sd reproduces, for the same images)."""
    top = float(np.float32(top))
    return top if cfg.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5


def euler_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """EulerDiscreteScheduler's timesteps (fractional for "linspace"; final sigma zero)."""
    table = train_sigmas(cfg)
    t = spaced_timesteps(cfg, n, integer=False).astype(np.float32)
    sigmas = np.interp(t, np.arange(len(table)), table)
    return _schedule(t, sigmas, 0.0, euler_noise_scale(cfg, sigmas.max()), vp=False)


def dpm_timesteps(cfg: ScheduleConfig, n: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's integer timesteps: "linspace" and "leading" space n + 1
    and drop the last."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif cfg.timestep_spacing == "leading":
        t = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
    else:
        t = spaced_timesteps(cfg, n, integer=True)
    return t.astype(np.int64)


def dpm_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """DPMSolverMultistepScheduler's schedule (final sigma zero)."""
    table = train_sigmas(cfg)
    t = dpm_timesteps(cfg, n)
    sigmas = np.interp(t, np.arange(len(table)), table)
    return _schedule(t, sigmas, 0.0, (1 + float(np.float32(sigmas[0])) ** 2) ** 0.5, vp=True)


def dpm_timestep_rule(t: np.ndarray, schedule: str) -> np.ndarray:
    """DPM-Solver rounds Karras sigmas' timesteps; the other flags' it casts to int64 (truncating)."""
    return t.round() if schedule == "karras" else np.trunc(t)


def kdpm2_timestep_rule(t: np.ndarray, schedule: str) -> np.ndarray:
    """KDPM2 rounds Karras sigmas' timesteps and keeps the other flags' fractional."""
    return t.round() if schedule == "karras" else t


def deis_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """DEISMultistepScheduler's: DPM-Solver's timesteps, but the run ends at sigma(t=0), not 0 (DEIS
    has no final_sigmas_type; with a flag it ends on the respaced sigma_min, the same level)."""
    table = train_sigmas(cfg)
    t = dpm_timesteps(cfg, n)
    sigmas = np.interp(t, np.arange(len(table)), table)
    return _schedule(t, sigmas, table[0], (1 + float(np.float32(sigmas[0])) ** 2) ** 0.5, vp=True)


def ddpm_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """DDPMScheduler's: DDIM's timesteps, each step landing on the next one (diffusers' previous_timestep
    once set_timesteps ran), the last on x0."""
    table = train_sigmas(cfg)
    t = spaced_timesteps(cfg, n, integer=True).astype(np.int64)
    return _schedule(t, table[t], 0.0, (1 + table[t[0]] ** 2) ** 0.5, vp=True)


def lcm_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """LCMScheduler's timesteps (Luo et al. 2023): the distillation schedule has
    `original_inference_steps` evenly spaced timesteps ending at T//k - 1; n of them are
    taken at evenly spaced indices, noisiest first. The last step lands on x0."""
    original = cfg.original_inference_steps
    if n > original:
        raise InputError(f"num_steps: the LCM sampler takes at most original_inference_steps={original} steps, got {n}")
    k = cfg.num_train_timesteps // original
    distilled = (np.arange(1, original + 1) * k - 1)[::-1]
    t = distilled[np.floor(np.linspace(0, original, n, endpoint=False)).astype(np.int64)]
    table = train_sigmas(cfg)
    return _schedule(t, table[t], 0.0, (1 + table[t[0]] ** 2) ** 0.5, vp=True)


def _euler_span(cfg, n, table):
    """Euler's flags convert the spaced sigmas' own range (in float64, as diffusers)."""
    t = spaced_timesteps(cfg, n, integer=False).astype(np.float32)
    sigmas = np.interp(t, np.arange(len(table)), table)
    return float(sigmas.min()), float(sigmas.max())


def _table_span(cfg, n, table):
    """DPM-Solver's flags convert the whole training range; so do families with no such flags,
    as k-diffusion and ComfyUI do."""
    return float(table[0]), float(table[-1])


TIMESTEPS: dict[str, Timesteps] = {
    "euler": Timesteps(euler_schedule, _euler_span, None, variance_preserving=False),  # Euler, Heun, LMS
    "kdpm2": Timesteps(euler_schedule, _euler_span, kdpm2_timestep_rule, variance_preserving=False),
    "dpm": Timesteps(dpm_schedule, _table_span, dpm_timestep_rule, variance_preserving=True),  # DPM-Solver, UniPC
    "deis": Timesteps(deis_schedule, _table_span, dpm_timestep_rule, variance_preserving=True,
                      ends_at_sigma_min=True),
    "ddim": Timesteps(ddim_schedule, _table_span, None, variance_preserving=True),  # DDIM, PNDM
    "ddpm": Timesteps(ddpm_schedule, _table_span, None, variance_preserving=True),
    "lcm": Timesteps(lcm_schedule, _table_span, None, variance_preserving=True),
}


def _check_steps(n):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"num_steps: must be a whole number of at least 1, got {n!r}")


def check_schedule(name: str) -> str:
    if name not in SCHEDULES:
        raise InputError(f"schedule: {name!r} is not one of {', '.join(SCHEDULES)}")
    return name


def on_sigmas(family: Timesteps, cfg: ScheduleConfig, sigmas: np.ndarray, schedule: str) -> Schedule:
    """A Schedule on given sigmas (descending, the last where the run ends): the UNet is told each
    sigma's timestep by the family's rule, and txt2img starts as the family starts."""
    table = train_sigmas(cfg)
    t = sigma_to_t(sigmas[:-1], table)
    if family.timestep_rule is not None:
        t = family.timestep_rule(t, schedule)
    top = float(np.float32(sigmas[0]))
    noise = (1 + top ** 2) ** 0.5 if family.variance_preserving else euler_noise_scale(cfg, top)
    return _schedule(t, sigmas[:-1], sigmas[-1], noise, family.variance_preserving)


def make_schedule(sampler: str, cfg: ScheduleConfig, n: int, schedule: str = "default", model: str = "sd15",
                  sigmas=None) -> Schedule:
    """The run `sampler` takes in n steps on `schedule`, or on explicit `sigmas` (descending;
    the last, usually 0, is where the run ends)."""
    spec, implied = resolve(sampler)
    family = TIMESTEPS[spec.timesteps]
    if sigmas is not None:
        return on_sigmas(family, cfg, check_sigmas(sigmas), "custom")
    _check_steps(n)
    schedule = check_schedule(implied or schedule)
    if schedule == "default":
        return family.default(cfg, n)
    table = train_sigmas(cfg)
    span = SigmaRange(table, *family.span(cfg, n, table), model)
    spread = SCHEDULES[schedule](n, span)
    return on_sigmas(family, cfg, np.concatenate([spread, [span.low if family.ends_at_sigma_min else 0.0]]), schedule)


def check_sigmas(sigmas) -> np.ndarray:
    """An explicit sigma list: 1-D, at least two values, finite, non-negative, descending."""
    values = np.asarray(sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise InputError(f"sigmas: must be a list of at least 2 noise levels, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(np.diff(values) >= 0):
        raise InputError("sigmas: must be finite, non-negative and strictly descending")
    return values
