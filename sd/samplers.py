"""Samplers as functions (after k-diffusion), and the one registry that names them.

The contract: `sample(model, x, sigmas, *, generator=None, callback=None, **its own options) -> x`.

- `model(x, sigma) -> x0` is any denoiser (see denoiser.py); sigma is a scalar tensor or one
  per image, shape (B,).
- `x` starts at noise level `sigmas[0]`; the result sits at `sigmas[-1]` (usually 0). Every
  mode of the pipeline (txt2img, img2img, inpainting) is a choice of `x`, `sigmas` and
  `model` around these same loops.
- `generator`: where fresh noise comes from; a list gives one generator per image of the
  batch, so each image's noise is what its own seed draws alone.
- `callback(step)`, if given, runs after every step with a `Step` (i, n, sigma, sigma_next,
  x, denoised); a tensor it returns replaces x. Progress bars, previews, cancellation,
  inpainting's blend and research hooks all go through it.

A new sampler is one function plus one line: decorate it with `@register("name", ...)`.
Everything else (the names `generate` accepts, the CLI's choices, the server's validation,
the README table, the tests' parametrisation) reads `SAMPLERS`.
"""

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | list[torch.Generator] | None
# Keyword arguments every sampler takes that are not options of its own.
PLUMBING = ("generator", "callback")


@dataclass
class Step:
    """What a callback sees after step i of n: the step went from sigma to sigma_next, its x0
    prediction was `denoised`, and `x` is where it landed."""
    i: int
    n: int
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    timesteps: str            # whose timesteps schedule="default" means: see schedule.TIMESTEPS
    twin: str | None          # the diffusers scheduler class that makes the same images
    twin_config: dict = field(default_factory=dict)  # settings of that class that pick this sampler
    needs: tuple[str, ...] = ()   # schedule data the pipeline hands over (DDIM's "landing")
    consistency: bool = False     # the denoiser gets LCM's boundary condition
    cite: str = ""

    @property
    def options(self) -> dict[str, object]:
        """The sampler's own keyword options and their defaults."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params
                if p.kind is p.KEYWORD_ONLY and p.name not in PLUMBING + self.needs}

    def check_options(self, options: dict) -> dict:
        """Each option by name, and its value by the annotation in the sampler's signature: one of a
        Literal's choices, or a real number for a float."""
        params = inspect.signature(self.fn).parameters
        for key, value in options.items():
            if key not in self.options:
                takes = ", ".join(self.options) or "no options"
                raise InputError(f"sampler_options: {self.name} takes no option {key!r} (it takes: {takes})")
            kind = params[key].annotation
            choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
            if choices and not any(type(value) is type(c) and value == c for c in choices):
                raise InputError(f"sampler_options: {self.name}'s {key} must be one of "
                                 f"{', '.join(map(repr, choices))}, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)):
                raise InputError(f"sampler_options: {self.name}'s {key} must be a number, got {value!r}")
        return dict(options)


SAMPLERS: dict[str, SamplerSpec] = {}
# Names people know that are a sampler on a schedule.
ALIASES: dict[str, tuple[str, str]] = {"dpmpp_2m_karras": ("dpmpp_2m", "karras")}


def register(name: str, *, timesteps: str = "euler", twin: str | None = None, twin_config: dict | None = None,
             needs: tuple[str, ...] = (), consistency: bool = False):
    """Add `fn` to SAMPLERS under `name`. Its docstring's first line is its citation."""
    def add(fn):
        cite = (fn.__doc__ or "").strip().split("\n")[0]
        SAMPLERS[name] = SamplerSpec(name, fn, timesteps, twin, twin_config or {}, needs, consistency, cite)
        return fn
    return add


def sampler_names() -> list[str]:
    return [*SAMPLERS, *ALIASES]


def resolve(name: str) -> tuple[SamplerSpec, str | None]:
    """A sampler name or alias -> (its spec, the schedule an alias implies, else None)."""
    if name in ALIASES:
        name, schedule = ALIASES[name]
        return SAMPLERS[name], schedule
    if name not in SAMPLERS:
        raise InputError(f"sampler: {name!r} is not one of {', '.join(sampler_names())}")
    return SAMPLERS[name], None


def twin_of(scheduler_class: str | None, config: dict) -> str | None:
    """The sampler whose diffusers twin a folder's scheduler_config.json names, if any: the class,
    and where several samplers share it, the settings that pick one (the first is the default)."""
    matches = [s for s in SAMPLERS.values() if scheduler_class is not None and s.twin == scheduler_class]
    for spec in matches:
        if all(config.get(k, v) == v for k, v in spec.twin_config.items()):
            return spec.name
    return matches[0].name if matches else None


def sampler_table() -> str:
    """The README's table of samplers (markdown), from the registry: one row per sampler and alias."""
    def settings(config):
        return ", ".join(f"{k}={v!r}".replace("'", '"') for k, v in config.items())

    rows = ["| `sampler=` | algorithm | options | diffusers twin |", "| --- | --- | --- | --- |"]
    for spec in SAMPLERS.values():
        options = ", ".join(f"`{k}={v!r}`" for k, v in spec.options.items())
        twin = f"`{spec.twin}({settings(spec.twin_config)})`" if spec.twin_config else f"`{spec.twin}`"
        rows.append(f"| `{spec.name}` | {spec.cite} | {options} | {twin if spec.twin else 'none'} |")
    for alias, (name, schedule) in ALIASES.items():
        spec = SAMPLERS[name]
        twin = f"`{spec.twin}({settings({**spec.twin_config, f'use_{schedule}_sigmas': True})})`"
        rows.append(f"| `{alias}` | `{name}` on the `{schedule}` schedule | | {twin} |")
    return "\n".join(rows)


def randn(shape, generator: Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn in float32 on the generator's device (the CPU for seeded runs), so a
    seed gives the same numbers as diffusers and the same image on every device. With a list of
    generators, row k of the batch comes from generator k."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=gen_device).to(device, dtype)


def end_step(callback, i: int, sigmas, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Every sampler ends each step here: the callback may replace x."""
    if callback is None:
        return x
    out = callback(Step(i, len(sigmas) - 1, sigmas[i], sigmas[i + 1], x, denoised))
    return x if out is None else out


# ---------------------------------------------------------------- pieces the samplers share


def ancestral_step(s, s_next, eta: float):
    """Split a step from s to s_next into a deterministic one down to sigma_down and fresh noise of
    sigma_up, sigma_down^2 + sigma_up^2 = s_next^2 (k-diffusion's get_ancestral_step); eta = 1 is
    DDPM's posterior (Ho et al. 2020), eta = 0 no noise."""
    sigma_up = torch.minimum(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
    sigma_down = (s_next ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def churn(x, sigma, n: int, generator: Generator, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
    """Karras et al. 2022, Algorithm 2, lines 4-6: before the step, raise the noise level from sigma
    to sigma_hat = sigma * (1 + gamma) with fresh noise, for sigma in [s_tmin, s_tmax]; n is the
    run's step count. Returns (x, sigma_hat); draws nothing where gamma = 0 (s_churn = 0: none)."""
    gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    eps = randn(x.shape, generator, x.device) * s_noise
    return x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5, sigma_hat


def lagrange_integrals(nodes: np.ndarray, start: float, end: float, log: bool = False) -> list[float]:
    """The integral from start to end of each Lagrange basis polynomial over `nodes`: in sigma
    (linear multistep), or in log-sigma with d(sigma) (DEIS's "log-rho"), in float64."""
    out = []
    for j in range(len(nodes)):
        if not log:
            others = np.delete(nodes, j)
            p = (np.poly1d(others, r=True) / np.prod(nodes[j] - others)).integ()
            out.append(float(p(end) - p(start)))
            continue
        # p is a polynomial in u = log(sigma), and the integral of p(u) e^u du is e^u (p - p' + p'' - ...).
        u = np.log(nodes)
        others = np.delete(u, j)
        p = np.poly1d(others, r=True) / np.prod(u[j] - others)
        terms = [p.deriv(m) * (-1) ** m for m in range(len(nodes))]
        antiderivative = lambda s: 0.0 if s == 0 else s * sum(q(math.log(s)) for q in terms)  # noqa: E731
        out.append(float(antiderivative(end) - antiderivative(start)))
    return out


# ---------------------------------------------------------------- the samplers


@register("euler", twin="EulerDiscreteScheduler")
@torch.no_grad()
def sample_euler(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler's method on the probability-flow ODE, with optional churn (Karras et al. 2022, Algorithm 2).
    With a DDPM model and sigmas at integer timesteps this is exactly DDIM with eta = 0."""
    for i in range(len(sigmas) - 1):
        x, sigma = churn(x, sigmas[i], len(sigmas) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma)
        d = (x - denoised) / sigma
        x = x + d * (sigmas[i + 1] - sigma)
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("euler_a", twin="EulerAncestralDiscreteScheduler")
@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Euler ancestral: an Euler step down, then fresh noise back up (k-diffusion; Ho et al. 2020).
    Each step from sigma to sigma_next goes to sigma_down deterministically and adds noise of
    sigma_up, as DDPM's ancestral sampling splits it."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(s, s_next, eta)
        x = x + (x - denoised) / s * (sigma_down - s)
        if s_next > 0:
            x = x + randn(x.shape, generator, x.device) * s_noise * sigma_up
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("heun", twin="HeunDiscreteScheduler")
@torch.no_grad()
def sample_heun(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 2).
    An Euler step, then the average of the slopes at both ends; Euler on the step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        x, sigma = churn(x, sigmas[i], len(sigmas) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma)
        d = (x - denoised) / sigma
        dt = sigmas[i + 1] - sigma
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("dpm_2", twin="KDPM2DiscreteScheduler", timesteps="kdpm2")
@torch.no_grad()
def sample_dpm_2(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """DPM-Solver-2 in Karras' form: the slope at the step's log-midpoint (Lu et al. 2022; k-diffusion).
    That slope carries the whole step; Euler on the step to sigma = 0."""
    for i in range(len(sigmas) - 1):
        x, sigma = churn(x, sigmas[i], len(sigmas) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma)
        d = (x - denoised) / sigma
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = (x_2 - model(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigmas[i + 1] - sigma)
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("dpm_2_ancestral", twin="KDPM2AncestralDiscreteScheduler", timesteps="kdpm2")
@torch.no_grad()
def sample_dpm_2_ancestral(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver-2 ancestral: a DPM-Solver-2 step down, then fresh noise back up (k-diffusion).
    Each step is split as Euler ancestral splits it."""
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        denoised = model(x, s)
        sigma_down, sigma_up = ancestral_step(s, sigmas[i + 1], eta)
        d = (x - denoised) / s
        if sigma_down == 0:
            x = x + d * (sigma_down - s)
        else:
            sigma_mid = s.log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - s)
            d_2 = (x_2 - model(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - s)
            x = x + randn(x.shape, generator, x.device) * s_noise * sigma_up
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("lms", twin="LMSDiscreteScheduler")
@torch.no_grad()
def sample_lms(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
               order: typing.Literal[1, 2, 3, 4] = 4):
    """Linear multistep: Adams-Bashforth in sigma over the last `order` slopes (k-diffusion's sample_lms).
    The slope is integrated as the polynomial through them; lower orders while history builds up."""
    nodes = sigmas.detach().double().cpu().numpy()
    slopes = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        slopes = (slopes + [(x - denoised) / sigmas[i]])[-order:]
        coeffs = lagrange_integrals(nodes[i - np.arange(len(slopes))], nodes[i], nodes[i + 1])
        x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes)))
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("ddim", timesteps="ddim", twin="DDIMScheduler", needs=("landing",))
@torch.no_grad()
def sample_ddim(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, landing=None):
    """DDIM with eta = 0 (Song et al. 2020, eq. 12), in sigma space an Euler step (Karras et al. 2022).
    x_prev = x0 + sigma_prev * eps is one Euler step (Karras et al. 2022, section 4).

    `landing[i]`, when given, is where step i lands instead of sigmas[i+1]; the result is then
    read as the latents at sigmas[i+1] (diffusers' DDIMScheduler with non-"leading" spacing)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        land = s_next if landing is None else landing[i]
        denoised = model(x, s)
        x = x + (x - denoised) / s * (land - s)
        if landing is not None:
            x = x * ((1 + s_next ** 2) / (1 + land ** 2)) ** 0.5  # same variance-preserving latents
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("ddpm", timesteps="ddpm", twin="DDPMScheduler")
@torch.no_grad()
def sample_ddpm(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on a subset of the training steps.
    Each step draws from the posterior q(x_next | x, x0): in sigma space, Euler ancestral with eta = 1."""
    return sample_euler_ancestral(model, x, sigmas, generator=generator, callback=callback)


@register("dpmpp_2s_ancestral")
@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                              eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral: a second-order step down, then fresh noise (Lu et al. 2022; k-diffusion).
    The single step is taken in lambda = -log(sigma), to sigma_down; then noise up to sigma_next."""
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        denoised = model(x, s)
        sigma_down, sigma_up = ancestral_step(s, sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - denoised) / s * (sigma_down - s)
        else:
            h = s.log() - sigma_down.log()
            sigma_mid = (s.log() - h / 2).exp()
            x_2 = (sigma_mid / s) * x - torch.expm1(-h / 2) * denoised
            x = (sigma_down / s) * x - torch.expm1(-h) * model(x_2, sigma_mid)
        if sigmas[i + 1] > 0:
            x = x + randn(x.shape, generator, x.device) * s_noise * sigma_up
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("dpmpp_sde")
@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5):
    """DPM-Solver++ (stochastic): two ancestral stages per step (Lu et al. 2022; k-diffusion).
    The stages end at the fraction r of the step in lambda = -log(sigma) and at its end, each
    adding fresh noise (here from the generator; k-diffusion's default is a Brownian tree)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        if s_next == 0:
            x = x + (x - denoised) / s * (s_next - s)
        else:
            h = s.log() - s_next.log()
            sigma_mid = (s.log() - r * h).exp()
            down, up = ancestral_step(s, sigma_mid, eta)
            x_2 = (down / s) * x - torch.expm1(down.log() - s.log()) * denoised
            x_2 = x_2 + randn(x.shape, generator, x.device) * s_noise * up
            denoised_2 = model(x_2, sigma_mid)
            down, up = ancestral_step(s, s_next, eta)
            mixed = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
            x = (down / s) * x - torch.expm1(down.log() - s.log()) * mixed
            x = x + randn(x.shape, generator, x.device) * s_noise * up
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("dpmpp_2m", timesteps="dpm", twin="DPMSolverMultistepScheduler",
          twin_config={"algorithm_type": "dpmsolver++"})
@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None):
    """DPM-Solver++(2M): second-order multistep in log-sigma (Lu et al. 2022, Algorithm 2).
    First order on the first step and on the step that lands on sigma = 0."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            x = denoised
        else:
            h = torch.log(s) - torch.log(s_next)  # step in lambda = -log(sigma)
            if old_denoised is not None:
                r = (torch.log(sigmas[i - 1]) - torch.log(s)) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            else:
                denoised_d = denoised
            x = (s_next / s) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("dpmpp_2m_sde", timesteps="dpm", twin="DPMSolverMultistepScheduler",
          twin_config={"algorithm_type": "sde-dpmsolver++"})
@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                        eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: typing.Literal["midpoint", "heun"] = "midpoint"):
    """DPM-Solver++(2M) SDE: the multistep update of the reverse SDE (Lu et al. 2022; k-diffusion).
    Fresh noise each step; eta = 0 is the ODE solver."""
    old_denoised = h_last = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()
            eta_h = eta * h
            x = s_next / s * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (torch.expm1(-h - eta_h) / (h + eta_h) + 1) / r * (denoised - old_denoised)
                else:
                    x = x - 0.5 * torch.expm1(-h - eta_h) / r * (denoised - old_denoised)
            if eta:
                noise = randn(x.shape, generator, x.device)
                x = x + noise * s_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
            h_last = h
        old_denoised = denoised
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("dpmpp_3m_sde", timesteps="dpm")
@torch.no_grad()
def sample_dpmpp_3m_sde(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                        eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(3M) SDE: the third-order multistep update of the reverse SDE (k-diffusion).
    Fresh noise each step; lower orders while history builds up."""
    history = []  # (x0 prediction, step h that followed it), newest last
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if len(history) >= 2:
                (denoised_2, h_2), (denoised_1, h_1) = history[-2:]
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif history:
                denoised_1, h_1 = history[-1]
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                noise = randn(x.shape, generator, x.device)
                x = x + noise * s_next * (-torch.expm1(-2 * h * eta)).sqrt() * s_noise
            history = (history + [(denoised, h)])[-2:]
        x = end_step(callback, i, sigmas, x, denoised)
    return x


def unipc_update(x, sigmas, i: int, history: list, order: int, bh2: bool, corrector_x0=None):
    """UniPC's step from sigmas[i] to sigmas[i+1] in x0 form (Zhao et al. 2023, Algorithms 1-3):
    the predictor UniP-p, or, given the x0 prediction made at sigmas[i+1], the corrector UniC-p.
    `history`: x0 predictions up to sigmas[i], newest last; B(h) = e^-h - 1 (bh2) or -h (bh1)."""
    lam = [-sigmas[i - k].log() for k in range(order)]
    h = -sigmas[i + 1].log() - lam[0]
    rks = [(lam[k] - lam[0]) / h for k in range(1, order)]
    d1s = [(history[-1 - k] - history[-1]) / r for k, r in enumerate(rks, 1)]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = h_phi_1 if bh2 else hh
    # R[j, k] = r_k^j and b_j = j! phi_(j+2)(hh) / B(h), with phi_k by its recurrence.
    rks_all = torch.stack(rks + [torch.ones_like(h)])
    R, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
        R.append(rks_all ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    x = sigmas[i + 1] / sigmas[i] * x - h_phi_1 * history[-1]
    if corrector_x0 is None:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else []
        return x - b_h * sum((rho * d for rho, d in zip(rhos, d1s)), torch.zeros_like(x))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b)
    correction = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x - b_h * (correction + rhos[-1] * (corrector_x0 - history[-1]))


@register("unipc", timesteps="dpm", twin="UniPCMultistepScheduler")
@torch.no_grad()
def sample_unipc(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                 order: typing.Literal[1, 2, 3] = 2, solver_type: typing.Literal["bh1", "bh2"] = "bh2"):
    """UniPC: a multistep predictor and a corrector from each new prediction (Zhao et al. 2023).
    Each new x0 prediction corrects the point it was made at before the next step; lower orders
    at the start and the end."""
    n = len(sigmas) - 1
    history, x_prev, last_order = [], None, 0
    for i in range(n):
        denoised = model(x, sigmas[i])
        if i > 0:
            x = unipc_update(x_prev, sigmas, i - 1, history, last_order, solver_type == "bh2", denoised)
        history = (history + [denoised])[-order:]
        last_order, x_prev = min(order, n - i, i + 1), x
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = unipc_update(x, sigmas, i, history, last_order, solver_type == "bh2")
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("deis", timesteps="deis", twin="DEISMultistepScheduler")
@torch.no_grad()
def sample_deis(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                order: typing.Literal[1, 2, 3] = 2):
    """DEIS: the noise prediction integrated as a polynomial in log-sigma (Zhang & Chen 2023).
    The polynomial goes through the last `order` predictions ("log-rho" multistep); first order at
    the start and, under 15 steps, lower orders at the end (diffusers' lower_order_final)."""
    nodes = sigmas.detach().double().cpu().numpy()
    n, eps = len(sigmas) - 1, []
    for i in range(n):
        denoised = model(x, sigmas[i])
        eps = (eps + [(x - denoised) / sigmas[i]])[-order:]
        k = min(len(eps), n - i) if n < 15 else len(eps)
        coeffs = lagrange_integrals(nodes[i - np.arange(k)], nodes[i], nodes[i + 1], log=True)
        x = x + sum(c * e for c, e in zip(coeffs, reversed(eps[-k:])))
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("plms", timesteps="ddim", twin="PNDMScheduler", twin_config={"skip_prk_steps": True})
@torch.no_grad()
def sample_plms(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None):
    """PLMS: Adams-Bashforth on the noise prediction, a Heun step to start (Liu et al. 2022).
    PNDM without its Runge-Kutta warm-up (diffusers' PNDMScheduler with skip_prk_steps)."""
    AB = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    history = []  # noise predictions eps = (x - x0) / sigma, newest last
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s)
        eps = (x - denoised) / s
        history = (history + [eps])[-4:]
        if i == 0 and n > 1:
            # Heun: average with the prediction at the Euler estimate of the next point.
            x_euler = x + eps * (s_next - s)
            eps = (eps + (x_euler - model(x_euler, s_next)) / s_next) / 2
        else:
            eps = sum(c * e for c, e in zip(AB[len(history)], reversed(history)))
        x = x + eps * (s_next - s)
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("lcm", timesteps="lcm", twin="LCMScheduler", consistency=True)
@torch.no_grad()
def sample_lcm(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None):
    """Latent consistency sampling: x0 by the consistency function, re-noised (Luo et al. 2023).
    Song et al. 2023, Algorithm 1: jump to the consistency model's x0, then re-noise it with fresh
    noise to the next sigma. `model` should apply the consistency boundary condition
    (denoiser.lcm_boundary_condition)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + randn(x.shape, generator, x.device) * sigmas[i + 1]
        x = end_step(callback, i, sigmas, x, denoised)
    return x
