"""Tiled VAE encode/decode (sd.vae.run_tiled): the same numbers as diffusers' enable_tiling()
on the same random weights, tiles placed exactly, and seams blended into ramps.

Tolerance: fp32, max |ours - ref| <= 1e-4 * max |ref|, as the untiled VAE tests.
"""

import torch
import torch.nn.functional as F

from helpers import VAE_CONFIGS, assert_close_scaled, vae_pair
from sd.vae import run_tiled

REL = 1e-4


def test_tiled_encode_and_decode_match_diffusers_tiling():
    cfg = VAE_CONFIGS["mult122-res1-g16-lat8"]  # 4 image pixels per latent pixel
    ours, ref = vae_pair(cfg, seed=1)
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size = 8, 32  # our tile=8 (latent pixels)
    g = torch.Generator().manual_seed(0)
    # Sides that leave partial tiles at the right and bottom edges (tiles start every 6).
    z = torch.randn(1, cfg.latent_channels, 21, 30, generator=g)
    x = torch.rand(1, 3, 84, 116, generator=g) * 2 - 1
    with torch.no_grad():
        tiled = ours.decode(z, tile=8)
        assert_close_scaled(tiled, ref.decode(z).sample, REL, "tiled decode")
        assert (tiled - ours.decode(z)).abs().max() > 1e-3, "the tiled path did not run"
        dist, ref_dist = ours.encode(x, tile=8), ref.encode(x).latent_dist
        assert_close_scaled(dist.mean, ref_dist.mean, REL, "tiled encode mean")
        assert_close_scaled(dist.std, ref_dist.std, REL, "tiled encode std")
        small = torch.randn(1, cfg.latent_channels, 8, 5, generator=g)  # fits one tile: not tiled
        torch.testing.assert_close(ours.decode(small, tile=8), ours.decode(small), rtol=0, atol=0)


def upsample(t):
    return F.interpolate(t, scale_factor=4, mode="nearest")


def test_tiles_are_placed_exactly():
    """With a function that treats every pixel alike, tiling changes nothing: any tile placed
    off by a pixel, cropped wrongly or lost at an edge would show."""
    z = torch.randn(2, 3, 37, 50, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(run_tiled(upsample, z, 8, 4), upsample(z), rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 3, 150, 90, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(run_tiled(lambda t: F.avg_pool2d(t, 4), x, 32, 1 / 4), F.avg_pool2d(x, 4),
                               rtol=1e-6, atol=1e-6)


def largest_step(image):
    """The largest difference between neighbouring pixels, across and down."""
    return max(image.diff(dim=-1).abs().max(), image.diff(dim=-2).abs().max()).item()


def test_a_per_tile_shift_becomes_a_ramp_not_a_step(monkeypatch):
    """What tiles really differ by is each tile's own GroupNorm statistics: a shift of its
    level. Here each tile's output is shifted by its own mean. Blended over the 1/4 overlap
    (8 output pixels), a shift difference d between touching tiles (diagonals included, where
    two blends meet) adds at most d / 8 to any step between neighbouring pixels; stitched
    without blending, it would be a step of d."""
    z = torch.linspace(0, 4, 40)[None, None, None, :] + 3 * torch.linspace(0, 1, 40)[None, None, :, None] ** 2

    def shifted(t):
        return upsample(t) + 5 * t.mean()

    def shift(i, j):
        return 5 * z[..., i:i + 8, j:j + 8].mean().item()
    starts = range(0, 40, 6)
    d = max(abs(shift(i, j) - shift(i + di, j + dj)) for i in starts for j in starts
            for di in (-6, 0, 6) for dj in (-6, 0, 6) if 0 <= i + di < 40 and 0 <= j + dj < 40)
    smooth = largest_step(upsample(z))
    assert d > 10 * smooth  # shifts that would show
    assert largest_step(run_tiled(shifted, z, 8, 4)) <= smooth + d / 8 + 1e-4
    monkeypatch.setattr("sd.vae.fade_in", lambda *args, **kwargs: None)
    assert largest_step(run_tiled(shifted, z, 8, 4)) > smooth + d / 2  # the check fails without blending


def test_the_pipeline_tiles_images_over_twice_the_native_area_or_as_told(monkeypatch):
    import sd
    from sd.tiny import CHECKPOINT
    pipe = sd.load(CHECKPOINT, device="cpu")  # native 64x64: tiles of 8 latent pixels
    assert pipe.vae_tile(64, 128) is None and pipe.vae_tile(96, 96) == 8
    pipe.vae_tiling = True
    assert pipe.vae_tile(64, 64) == 8
    pipe.vae_tiling = False
    assert pipe.vae_tile(512, 512) is None
    pipe.vae_tiling = None
    calls = []
    monkeypatch.setattr("sd.vae.run_tiled", lambda *args: calls.append(args[2]) or run_tiled(*args))
    image = pipe.generate("a red circle", width=128, height=96, num_steps=2, seed=0)
    assert image.size == (128, 96) and calls == [8]  # the decode ran in tiles
