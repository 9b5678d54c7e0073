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
from collections.abc import Callable
from dataclasses import dataclass, field

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
        for key in options:
            if key not in self.options:
                takes = ", ".join(self.options) or "no options"
                raise InputError(f"sampler_options: {self.name} takes no option {key!r} (it takes: {takes})")
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
    matches = [s for s in SAMPLERS.values() if s.twin == scheduler_class]
    for spec in matches:
        if all(config.get(k, v) == v for k, v in spec.twin_config.items()):
            return spec.name
    return matches[0].name if matches else None


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


# ---------------------------------------------------------------- the samplers


@register("euler", twin="EulerDiscreteScheduler")
@torch.no_grad()
def sample_euler(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn).
    With a DDPM model and sigmas at integer timesteps this is exactly DDIM with eta = 0."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("euler_a", twin="EulerAncestralDiscreteScheduler")
@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
                           eta: float = 1.0):
    """Euler ancestral (k-diffusion): an Euler step down to sigma_down, then fresh noise up to
    sigma_next, splitting each step as DDPM's ancestral sampling does (Ho et al. 2020)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = torch.minimum(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
        sigma_down = (s_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - denoised) / s * (sigma_down - s)
        if s_next > 0:
            x = x + randn(x.shape, generator, x.device) * sigma_up
        x = end_step(callback, i, sigmas, x, denoised)
    return x


@register("ddim", timesteps="ddim", twin="DDIMScheduler", needs=("landing",))
@torch.no_grad()
def sample_ddim(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, landing=None):
    """DDIM, eta = 0 (Song et al. 2020, eq. 12): x_prev = x0 + sigma_prev * eps, which in
    sigma space is one Euler step (Karras et al. 2022, section 4).

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


@register("dpmpp_2m", timesteps="dpm", twin="DPMSolverMultistepScheduler",
          twin_config={"algorithm_type": "dpmsolver++"})
@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in log-sigma,
    first order on the first step and on the step that lands on sigma = 0."""
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


@register("plms", timesteps="ddim", twin="PNDMScheduler")
@torch.no_grad()
def sample_plms(model: Denoiser, x, sigmas, *, generator: Generator = None, callback=None):
    """PLMS / PNDM without Runge-Kutta warm-up (Liu et al. 2022; diffusers' PNDMScheduler with
    skip_prk_steps): Adams-Bashforth on the noise prediction, a Heun step to start."""
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
    """Latent consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023): jump to the
    consistency model's x0, then re-noise it with fresh noise to the next sigma. `model` should
    apply the consistency boundary condition (denoiser.lcm_boundary_condition)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + randn(x.shape, generator, x.device) * sigmas[i + 1]
        x = end_step(callback, i, sigmas, x, denoised)
    return x
