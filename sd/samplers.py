"""Samplers as functions (after k-diffusion): `sample_x(model, x, sigmas, ...) -> x`.

`model(x, sigma) -> denoised x0` is any denoiser (see denoiser.py); `x` starts at
noise level `sigmas[0]` and the result sits at `sigmas[-1]` (usually 0). Every
mode of the pipeline (txt2img, img2img, inpainting) is a choice of `x`, `sigmas`
and `model` around these same loops, plus an optional `after_step(i, x) -> x` that
may edit the latents between steps (inpainting with a plain UNet re-imposes the
known region there).
"""

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None] | None
AfterStep = Callable[[int, torch.Tensor], torch.Tensor] | None


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn in float32 on the generator's device (the CPU for seeded runs), so a
    seed gives the same numbers as diffusers and the same image on every device."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=gen_device).to(device, dtype)


def _end_step(x, i: int, n: int, progress: Progress, after_step: AfterStep):
    if after_step is not None:
        x = after_step(i, x)
    if progress is not None:
        progress(i + 1, n)
    return x


@torch.no_grad()
def sample_euler(model: Denoiser, x, sigmas, progress: Progress = None, after_step: AfterStep = None, **_):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn).
    With a DDPM model and sigmas at integer timesteps this is exactly DDIM with eta = 0."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = _end_step(x, i, len(sigmas) - 1, progress, after_step)
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x, sigmas, landing=None, progress: Progress = None,
                after_step: AfterStep = None, **_):
    """DDIM, eta = 0 (Song et al. 2020, eq. 12): x_prev = x0 + sigma_prev * eps, which in
    sigma space is one Euler step (Karras et al. 2022, section 4).

    `landing[i]`, when given, is where step i lands instead of sigmas[i+1]; the result is then
    read as the latents at sigmas[i+1] (diffusers' DDIMScheduler with non-"leading" spacing)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        land = s_next if landing is None else landing[i]
        x = x + (x - model(x, s)) / s * (land - s)
        if landing is not None:
            x = x * ((1 + s_next ** 2) / (1 + land ** 2)) ** 0.5  # same variance-preserving latents
        x = _end_step(x, i, len(sigmas) - 1, progress, after_step)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x, sigmas, generator=None, eta: float = 1.0,
                           progress: Progress = None, after_step: AfterStep = None, **_):
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
        x = _end_step(x, i, len(sigmas) - 1, progress, after_step)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x, sigmas, progress: Progress = None, after_step: AfterStep = None, **_):
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
        x = _end_step(x, i, len(sigmas) - 1, progress, after_step)
    return x


@torch.no_grad()
def sample_plms(model: Denoiser, x, sigmas, progress: Progress = None, after_step: AfterStep = None, **_):
    """PLMS / PNDM without Runge-Kutta warm-up (Liu et al. 2022; diffusers' PNDMScheduler with
    skip_prk_steps): Adams-Bashforth on the noise prediction, a Heun step to start."""
    AB = {1: (1,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    history = []  # noise predictions eps = (x - x0) / sigma, newest last
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        eps = (x - model(x, s)) / s
        history = (history + [eps])[-4:]
        if i == 0 and n > 1:
            # Heun: average with the prediction at the Euler estimate of the next point.
            x_euler = x + eps * (s_next - s)
            eps = (eps + (x_euler - model(x_euler, s_next)) / s_next) / 2
        else:
            eps = sum(c * e for c, e in zip(AB[len(history)], reversed(history)))
        x = x + eps * (s_next - s)
        x = _end_step(x, i, n, progress, after_step)
    return x


@torch.no_grad()
def sample_lcm(model: Denoiser, x, sigmas, generator=None, progress: Progress = None,
               after_step: AfterStep = None, **_):
    """Latent consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023): jump to the
    consistency model's x0, then re-noise it with fresh noise to the next sigma. `model` should
    apply the consistency boundary condition (denoiser.lcm_boundary_condition)."""
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + randn(x.shape, generator, x.device) * sigmas[i + 1]
        x = _end_step(x, i, len(sigmas) - 1, progress, after_step)
    return x


SAMPLER_FUNCTIONS = {
    "plms": sample_plms,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
    "lcm": sample_lcm,
}
