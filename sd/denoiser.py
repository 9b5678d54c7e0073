"""From a UNet that predicts noise (or v, or x0) at a DDPM timestep to a denoiser
D(x, sigma) -> x0 in sigma space (Karras et al. 2022, Table 1), plus classifier-free guidance.

sigma is a scalar tensor or one per image, shape (B,), as k-diffusion's samplers pass it.
"""

from collections.abc import Callable

import numpy as np
import torch

from .schedule import Schedule, sigma_to_t

# model(x_in, t) -> raw UNet output, x_in already scaled to unit variance; t () or (B,).
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A guidance formula on the two x0 predictions: (uncond, cond, sigma) -> guided x0.
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def per_image(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) sigma shaped to broadcast over (B, C, H, W); a scalar stays a scalar."""
    return sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma


def _both(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t]) if t.ndim else t


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024, section 3.4: scale the guided prediction back to the conditional one's
    standard deviation (per image), then mix by phi, to undo CFG's over-exposure."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def classifier_free_guidance(unet_call: Callable, cond, uncond, scale: float, rescale: float = 0.0) -> ModelFn:
    """Ho & Salimans 2022: out = uncond + scale * (cond - uncond), both halves in one batch of 2B,
    on the UNet's own output (as diffusers; guidance_rescale then works on that output too).
    `cond` / `uncond` are dicts of UNet keyword inputs (context, y). No guidance when uncond is None."""
    if uncond is None:
        return lambda x, t: unet_call(x, t, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def guided(x, t):
        out_uncond, out_cond = unet_call(torch.cat([x, x]), _both(t), **both).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(out, out_cond, rescale) if rescale else out
    return guided


def both_halves(unet_call: Callable, cond, uncond) -> ModelFn:
    """The UNet on [x, x] with the unconditional inputs first: for guidance formulas of one's own."""
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    return lambda x, t: unet_call(x, t, **both)


def custom_guidance(denoiser_of_both: Callable, formula: GuidanceFn) -> Callable:
    """D(x, sigma) = formula(uncond x0, cond x0, sigma), both predictions from one batch of 2B."""
    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        uncond, cond = denoiser_of_both(torch.cat([x, x]), _both(sigma)).chunk(2)
        return formula(uncond, cond, sigma)
    return guided


class Denoiser:
    """Wraps `model` for the sampler loops.

    Given the run's `schedule`, the UNet is told, for each of its sigmas, the timestep diffusers'
    scheduler would tell it (these can be fractional, or rounded, depending on the scheduler);
    any other sigma, e.g. a midpoint of a higher-order sampler, maps through log-sigma
    interpolation of the training schedule.
    """

    def __init__(self, model: ModelFn, schedule: Schedule | None, train_sigmas: np.ndarray, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: {prediction_type!r} is not 'epsilon', 'v_prediction' or 'sample'")
        self.model, self.prediction_type, self.train_sigmas = model, prediction_type, train_sigmas
        self.timestep_of = ({float(s): t for s, t in zip(schedule.sigmas, schedule.timesteps)}
                            if schedule is not None else {})
        self.on_device: dict = {}  # (sigma, device) -> timestep there: one copy per step per run

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """float32 timestep(s) for a scalar or (B,) sigma."""
        if sigma.ndim:
            return torch.stack([self.timestep(s) for s in sigma])
        t = self.timestep_of.get(float(sigma))
        if t is None:
            t = torch.tensor(sigma_to_t(np.array([float(sigma)]), self.train_sigmas)[0], dtype=torch.float32)
        return t

    def timestep_on(self, sigma: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The timestep on the model's device. A scalar sigma's is copied there once per run: a
        copy from pageable host memory waits for the device, which should be running ahead."""
        if sigma.ndim or sigma.device.type != "cpu":
            return self.timestep(sigma).to(device)
        key = (float(sigma), device)
        if key not in self.on_device:
            self.on_device[key] = self.timestep(sigma).to(device)
        return self.on_device[key]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = self.timestep_on(sigma, x.device)
        sigma = per_image(sigma, x)
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        out = self.model(x * c_in, t).to(x.dtype)
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
        t = denoiser.timestep(sigma).double() * timestep_scaling
        c_skip = per_image((sigma_data ** 2 / (t ** 2 + sigma_data ** 2)).float(), x).to(x.device)
        c_out = per_image((t / (t ** 2 + sigma_data ** 2) ** 0.5).float(), x).to(x.device)
        return c_out * denoiser(x, sigma) + c_skip * x / (per_image(sigma, x) ** 2 + 1) ** 0.5
    return consistency
