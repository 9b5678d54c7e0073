"""sd.vae.AutoencoderKL vs diffusers' AutoencoderKL on tiny random-weight configs.

Our state dict is the single-file (LDM) layout under `first_stage_model.`; diffusers' own
`convert_ldm_vae_checkpoint` turns it into a diffusers state dict, loaded with strict=True.
All parameters (GroupNorms included) are randomised first.

Tolerance: fp32 on both sides, max |ours - ref| <= 1e-4 * max |ref| (relative to the output's scale).
"""

import pytest
import torch

from helpers import VAE_CONFIGS, assert_close_scaled, vae_pair

REL = 1e-4  # fp32, relative to max |ref|

# (H, W): non-square both ways, plus one whose halving hits odd sizes (LDM's right/bottom-only padding).
SHAPES = [(48, 32), (32, 40), (44, 26)]


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_matches_diffusers(name):
    cfg = VAE_CONFIGS[name]
    ours, ref = vae_pair(cfg)
    assert ref.config.scaling_factor == ours.cfg.scaling_factor
    down = 2 ** (len(cfg.channel_mult) - 1)
    for h, w in SHAPES:
        tag = f"vae {name} {h}x{w}"
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w)) * 2 - 1
        with torch.no_grad():
            dist = ours.encode(x)
            ref_dist = ref.encode(x).latent_dist
            assert dist.mean.shape[:2] == (2, cfg.latent_channels)
            assert_close_scaled(dist.mean, ref_dist.mean, REL, f"{tag} mean")
            assert_close_scaled(dist.std, ref_dist.std, REL, f"{tag} std")

            z = dist.sample(torch.Generator("cpu").manual_seed(0))
            ref_z = ref_dist.sample(generator=torch.Generator("cpu").manual_seed(0))
            assert_close_scaled(z, ref_z, REL, f"{tag} sample")
            assert (z - dist.mean).abs().max() > 1e-3 * dist.mean.abs().max()  # noise really added

            out = ours.decode(z)
            ref_out = ref.decode(z).sample
            assert out.shape == (2, 3, z.shape[2] * down, z.shape[3] * down)
            assert_close_scaled(out, ref_out, REL, f"{tag} decode")


@pytest.mark.parametrize("shift", [60.0, -80.0], ids=["logvar-clamp-high", "logvar-clamp-low"])
def test_vae_logvar_clamp_matches_diffusers(shift):
    """Push logvar past diffusers' clamp range [-30, 20] so the clamp decides the std."""
    cfg = VAE_CONFIGS["mult12-res1-g8"]
    ours, ref = vae_pair(cfg, seed=3, logvar_shift=shift)
    x = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        dist, ref_dist = ours.encode(x), ref.encode(x).latent_dist
    torch.testing.assert_close(dist.std, ref_dist.std, rtol=REL, atol=0.0)  # tiny values when low
    bound = torch.exp(torch.tensor(0.5 * (20.0 if shift > 0 else -30.0)))
    torch.testing.assert_close(dist.std, torch.full_like(dist.std, bound.item()))


def test_vae_flat_image_matches_diffusers():
    """A nearly flat image (a plain colour, as in real photos' sky or studio backgrounds): low variance
    inside each GroupNorm group, where the norms' eps matters."""
    cfg = VAE_CONFIGS["mult122-res1-g16-lat8"]
    ours, ref = vae_pair(cfg, seed=4)
    gen = torch.Generator().manual_seed(6)
    x = torch.tensor([0.3, -0.2, 0.5])[None, :, None, None] + 1e-3 * torch.randn(1, 3, 32, 24, generator=gen)
    with torch.no_grad():
        dist, ref_dist = ours.encode(x), ref.encode(x).latent_dist
        assert_close_scaled(dist.mean, ref_dist.mean, REL, "vae flat mean")
        assert_close_scaled(dist.std, ref_dist.std, REL, "vae flat std")
        assert_close_scaled(ours.decode(dist.mean), ref.decode(ref_dist.mean).sample, REL, "vae flat decode")
