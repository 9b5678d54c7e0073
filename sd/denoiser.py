"""From a UNet that predicts noise (or v, or x0) at a DDPM timestep to a denoiser
D(x, sigma) -> x0 in sigma space (Karras et al. 2022, Table 1), plus classifier-free guidance."""

from collections.abc import Callable

import numpy as np
import torch

from .schedule import Schedule, sigma_to_t

# model(x_in, t) -> raw UNet output, x_in already scaled to unit variance.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(unet_call: Callable, cond, uncond, scale: float) -> ModelFn:
    """Ho & Salimans 2022: out = uncond + scale * (cond - uncond), both halves in one batch of 2.
    `cond` / `uncond` are dicts of UNet keyword inputs (context, y). No guidance when uncond is None."""
    if uncond is None:
        return lambda x, t: unet_call(x, t, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def guided(x, t):
        out_uncond, out_cond = unet_call(torch.cat([x, x]), t, **both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)
    return guided


class Denoiser:
    """Wraps `model` for the sampler loops.

    The UNet is told, for each sigma of the schedule, the timestep diffusers' scheduler
    would tell it (these can be fractional, or rounded, depending on the scheduler); any
    other sigma, e.g. a midpoint of a higher-order sampler, maps through log-sigma
    interpolation of the training schedule.
    """

    def __init__(self, model: ModelFn, schedule: Schedule, train_sigmas: np.ndarray, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: {prediction_type!r} is not 'epsilon', 'v_prediction' or 'sample'")
        self.model, self.prediction_type, self.train_sigmas = model, prediction_type, train_sigmas
        self.timestep_of = {float(s): t for s, t in zip(schedule.sigmas, schedule.timesteps)}

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self.timestep_of.get(float(sigma))
        if t is None:
            t = torch.tensor(sigma_to_t(np.array([float(sigma)]), self.train_sigmas)[0], dtype=torch.float32)
        return t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        out = self.model(x * c_in, self.timestep(sigma).to(x.device)).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x * c_in ** 2 - out * sigma * c_in
        return out


def lcm_boundary_condition(denoiser: Denoiser, timestep_scaling: float) -> Callable:
    """Latent consistency models' parameterisation f(x, t) = c_skip(t) x + c_out(t) x0(x, t)
    (Song et al. 2023, eq. 3, with sigma_data = 0.5 and t scaled as LCMScheduler does), so that
    f is the identity at t = 0. x enters in its variance-preserving form, as the model saw it."""
    sigma_data = 0.5

    def consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = float(denoiser.timestep(sigma)) * timestep_scaling
        c_skip = sigma_data ** 2 / (t ** 2 + sigma_data ** 2)
        c_out = t / (t ** 2 + sigma_data ** 2) ** 0.5
        return c_out * denoiser(x, sigma) + c_skip * x / (sigma ** 2 + 1) ** 0.5
    return consistency
