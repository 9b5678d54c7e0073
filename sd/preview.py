"""A picture of latents without the VAE: each latent pixel's 4 channels mapped to RGB by one
4x3 matrix and a bias, the cheap preview A1111 and ComfyUI show while a run is under way.

The official SD 1.5 and SDXL autoencoders have published factors (ComfyUI's latent_formats.py);
for any other autoencoder (the tiny model's), the factors are fitted once by least squares on
what that autoencoder itself makes of pictures of flat colours and shapes (sd/shapes.py).
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import shapes
from .vae import VAE_SD15, VAE_SDXL

# (4x3 matrix, RGB bias) for latents scaled as the UNet sees them; output in [-1, 1].
PUBLISHED = {
    VAE_SD15: ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    VAE_SDXL: ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}
# Enough pictures to pin down 15 numbers; 32 at 64x64 encode in well under a second on a CPU.
# On the tiny model's own images the fitted preview correlates 0.82 with the decoded picture,
# where the best linear map (fitted on those very images) reaches 0.85: the rest is nonlinear.
FIT_SIDE, FIT_IMAGES = 64, 32


def factors(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's (4x3 matrix, bias), published or fitted, kept on its VAE."""
    cached = getattr(pipe.vae, "preview_factors", None)
    if cached is None:
        known = PUBLISHED.get(pipe.vae.cfg)
        cached = tuple(torch.tensor(v) for v in known) if known else fit(pipe)
        pipe.vae.preview_factors = cached
    return cached


@torch.inference_mode()
def fit(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares from scaled latents to the RGB (in [-1, 1]) of the pixels each latent covers,
    over pictures of shapes encoded by this autoencoder (its posterior mean)."""
    pictures, _, _ = shapes.sample(seed=0, n=FIT_IMAGES, size=FIT_SIDE)
    pixels = torch.from_numpy(pictures.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    latents = pipe.vae.encode(pixels.to(pipe.device, pipe.vae_dtype)).mean.float().cpu() * pipe.vae.cfg.scaling_factor
    rgb = F.avg_pool2d(pixels, pipe.vae.scale)  # (N, 3, h, w): the colour each latent pixel covers
    X = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]),
                   torch.ones(latents.numel() // latents.shape[1], 1)], dim=1)
    Y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(X.double(), Y.double()).solution.float()
    return solution[:-1], solution[-1]


def preview(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """(B, C, h, w) latents -> B small RGB pictures, one pixel per latent pixel."""
    matrix, bias = factors(pipe)
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), matrix) + bias
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]
