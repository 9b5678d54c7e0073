"""How long a job will take on this device, and the refusal of a job that cannot finish in time.

The model: a UNet call's time grows with the image's pixels. When a model loads, one UNet call
(a batch of one) is timed at half the model's native side; a job's time is then that rate x its
megapixels x its UNet calls (the steps that run, twice with classifier-free guidance, per image).
Attention grows faster than the pixel count, so above the measured size this underestimates;
a job is refused only when even this estimate is far (REFUSE_FACTOR times) past the timeout.
The text encoders and the VAE are left out: a few UNet calls' worth.
"""

import math
import time
from dataclasses import dataclass

import torch

from ..defaults import Defaults
from .jobs import GenerationJob

REFUSE_FACTOR = 2.0


class TooSlow(Exception):
    """The job's estimated time is far past the server's timeout; the message names the size, the
    steps, the estimate and the limit, and the largest size that fits."""


@dataclass(frozen=True)
class Work:
    """What a job asks of the UNet."""
    width: int
    height: int
    steps: int           # the steps that run (img2img runs int(steps * strength))
    calls: int           # UNet calls of a batch of one: steps x 2 with CFG x images

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def work_of(job: GenerationJob, defaults: Defaults) -> Work:
    k = job.kwargs
    width, height = k.get("width") or defaults.width, k.get("height") or defaults.height
    steps = k.get("num_steps") or defaults.num_steps
    if k.get("image") is not None:
        strength = k.get("strength")
        strength = defaults.strength_for(k.get("mask") is not None) if strength is None else strength
        steps = int(steps * strength)
    guidance = k.get("guidance")
    cfg = (defaults.guidance if guidance is None else guidance) > 1
    return Work(width, height, steps, steps * (2 if cfg else 1) * (k.get("num_images") or 1))


def measure(pipe, clock=time.perf_counter) -> float:
    """Seconds per megapixel per UNet call on the pipeline's device: one call at half the native
    side, after one at the smallest size has paid for the one-time setup (allocations, kernels)."""
    cfg, scale = pipe.unet.cfg, pipe.vae.scale
    side = max(pipe.sample_size // 2 // scale, 8)

    def call(latent_side: int):
        x = torch.zeros(1, cfg.in_channels, latent_side, latent_side, device=pipe.device, dtype=pipe.dtype)
        context = torch.zeros(1, 77, cfg.context_dim, device=pipe.device, dtype=pipe.dtype)
        y = torch.zeros(1, cfg.adm_in_channels, device=pipe.device) if cfg.adm_in_channels else None
        w = torch.zeros(1, device=pipe.device) if cfg.time_cond_proj_dim else None
        with torch.inference_mode():
            pipe.unet(x, torch.tensor([500.0], device=pipe.device), context, y, w)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)

    call(8)
    start = clock()
    call(side)
    return (clock() - start) / ((side * scale) ** 2 / 1e6)


class Speeds:
    """Each loaded model's measured rate, and the check a job passes before it runs."""

    def __init__(self, timeout: float | None, device: str = ""):
        self.timeout, self.device = timeout, device
        self.rates: dict[str, float] = {}        # model id -> seconds per megapixel per UNet call

    def estimate(self, job: GenerationJob, defaults: Defaults) -> float | None:
        rate = self.rates.get(job.model)
        if rate is None:
            return None
        work = work_of(job, defaults)
        return rate * work.megapixels * work.calls

    def check(self, job: GenerationJob, defaults: Defaults) -> None:
        """Raise TooSlow if the job is expected to take over REFUSE_FACTOR x the timeout here
        (nothing is known before the model's first load: then it runs, and stops at the timeout)."""
        seconds = self.estimate(job, defaults)
        if seconds is None or not self.timeout or seconds <= REFUSE_FACTOR * self.timeout:
            return
        work = work_of(job, defaults)
        per_pixel = seconds / (work.width * work.height)
        side = int(math.sqrt(self.timeout / per_pixel)) // 64 * 64
        fits = (f"at most about {side}x{side} fits in it at {work.steps} steps" if side >= 64
                else f"use fewer than {work.steps} steps")
        raise TooSlow(f"width x height: {work.width}x{work.height} at {work.steps} steps would take about "
                      f"{seconds:.0f} s on this server's {self.device or 'device'}, far past its time limit of "
                      f"{self.timeout:g} s (--timeout); {fits}")
