"""The cheap latent preview (sd/preview.py): published factors for the official autoencoders, fitted
ones for others, and a preview that looks like the picture the VAE makes of the same latents."""

import numpy as np
import torch

import sd
from sd import preview
from sd.tiny import CHECKPOINT
from sd.vae import VAE_SD15, VAE_SDXL


class OfficialVAE:
    """Stands in for a pipeline whose autoencoder has the official config: only the config is read."""

    def __init__(self, cfg):
        self.vae = type("VAE", (), {"cfg": cfg})()


def test_official_autoencoders_take_the_published_factors():
    for cfg in (VAE_SD15, VAE_SDXL):
        matrix, bias = preview.factors(OfficialVAE(cfg))
        published = preview.PUBLISHED[cfg]
        assert torch.equal(matrix, torch.tensor(published[0])) and torch.equal(bias, torch.tensor(published[1]))
        assert matrix.shape == (4, 3)


def test_the_tiny_models_preview_looks_like_its_picture():
    """Fitted on pictures of shapes, the preview of generated latents tracks the decoded image: the
    8x8 preview against the picture shrunk to 8x8. (A preview from the SD 1.5 factors, made for
    another autoencoder, is the broken variant: it must do clearly worse.)"""
    pipe = sd.load(CHECKPOINT)
    prompts = ["a large red square in the center, blue background", "a small yellow circle on the left, "
               "black background", "a green triangle at the top, white background"]
    latents = pipe.generate(prompts, seed=[0, 1, 2], num_steps=12, output="latent").tensor
    pictures = pipe.decode(latents)
    previews = preview.preview(pipe, latents)
    fitted = correlation(previews, pictures)
    pipe.vae.preview_factors = tuple(torch.tensor(v) for v in preview.PUBLISHED[VAE_SD15])
    wrong = correlation(preview.preview(pipe, latents), pictures)
    print(f"[preview] correlation with the decoded picture: fitted {fitted:.2f}, SD 1.5's factors {wrong:.2f}")
    assert previews[0].size == (8, 8) and fitted > 0.7 and wrong < fitted - 0.2


def correlation(previews, pictures) -> float:
    a = np.concatenate([np.asarray(p, float).ravel() for p in previews])
    b = np.concatenate([np.asarray(q.resize(p.size, resample=3), float).ravel() for p, q in zip(previews, pictures)])
    return float(np.corrcoef(a, b)[0, 1])
