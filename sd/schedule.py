"""Noise schedules: DDPM betas -> alphas_cumprod -> sigmas, and the timesteps each sampler visits.

Samplers work in k-diffusion's variance-exploding form, x = x0 + sigma * eps with
sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod). The timestep rules below
follow diffusers' schedulers exactly (Lin et al. 2023, Table 2, names the spacings).
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "plms", "lcm")

# diffusers scheduler class -> our sampler, for a folder's scheduler_config.json.
SCHEDULER_CLASSES = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "PNDMScheduler": "plms",  # SD 1.5's default; we run its PLMS form (skip_prk_steps, as SD's config sets)
    "LCMScheduler": "lcm",
}


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
    use_karras_sigmas: bool = False
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


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: steps evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)  # float64 math, as diffusers
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


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


def euler_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler timesteps (final sigma zero)."""
    table = train_sigmas(cfg)
    t = spaced_timesteps(cfg, n, integer=False).astype(np.float32)
    sigmas = np.interp(t, np.arange(len(table)), table)
    if cfg.use_karras_sigmas:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], n)
        t = sigma_to_t(sigmas, table)
    top = float(np.float32(sigmas.max()))
    noise_scale = top if cfg.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5
    return _schedule(t, sigmas, 0.0, noise_scale, vp=False)


def dpm_schedule(cfg: ScheduleConfig, n: int, karras: bool = False) -> Schedule:
    """DPMSolverMultistepScheduler timesteps (integer; final sigma zero)."""
    table = train_sigmas(cfg)
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif cfg.timestep_spacing == "leading":
        t = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
    else:
        t = spaced_timesteps(cfg, n, integer=True)
    t = t.astype(np.int64)
    if karras or cfg.use_karras_sigmas:
        sigmas = karras_sigmas(table[0], table[-1], n)
        t = sigma_to_t(sigmas, table).round()
    else:
        sigmas = np.interp(t, np.arange(len(table)), table)
    return _schedule(t, sigmas, 0.0, (1 + float(np.float32(sigmas[0])) ** 2) ** 0.5, vp=True)


def lcm_schedule(cfg: ScheduleConfig, n: int) -> Schedule:
    """LCMScheduler's timesteps (Luo et al. 2023): the distillation schedule has
    `original_inference_steps` evenly spaced timesteps ending at T//k - 1; n of them are
    taken at evenly spaced indices, noisiest first. The last step lands on x0."""
    original = cfg.original_inference_steps
    if n > original:
        raise ValueError(f"num_steps: the LCM sampler takes at most original_inference_steps={original} steps, got {n}")
    k = cfg.num_train_timesteps // original
    distilled = (np.arange(1, original + 1) * k - 1)[::-1]
    t = distilled[np.floor(np.linspace(0, original, n, endpoint=False)).astype(np.int64)]
    table = train_sigmas(cfg)
    return _schedule(t, table[t], 0.0, (1 + table[t[0]] ** 2) ** 0.5, vp=True)


def make_schedule(sampler: str, cfg: ScheduleConfig, n: int) -> Schedule:
    if n < 1:
        raise ValueError(f"num_steps: must be at least 1, got {n}")
    if sampler == "lcm":
        return lcm_schedule(cfg, n)
    if sampler in ("ddim", "plms"):
        return ddim_schedule(cfg, n)
    if sampler in ("euler", "euler_a"):
        return euler_schedule(cfg, n)
    if sampler in ("dpmpp_2m", "dpmpp_2m_karras"):
        return dpm_schedule(cfg, n, karras=sampler == "dpmpp_2m_karras")
    raise ValueError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
