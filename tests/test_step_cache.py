"""Step caching (DeepCache, Ma et al. 2024): generate(..., step_cache=N).

What is checked without timing anything: the shallow branch on an unchanged input is the whole
UNet exactly; off (or N = 1) changes nothing; a cached run is deterministic, works with every
sampler, CFG, batches, img2img and SDXL; and it does measurably less work, counted in FLOPs
on full-size SD 1.5 and SDXL UNets built on the meta device.
"""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sd
from sd.samplers import SAMPLERS
from sd.tiny import CHECKPOINT
from sd.unet import SD15, SDXL, DeepCache, UNet, UNetConfig
from sd.weights import no_weight_init

PROMPT = "a small red circle on the left, blue background"


@pytest.fixture(scope="module")
def tiny():
    return sd.load(CHECKPOINT, device="cpu")


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("cfg", [UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1),
                                            heads=(2, 2), context_dim=16),
                                 UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                                            mid_transformer_depth=2, heads=(1, 1, 2), context_dim=16,
                                            linear_proj=True, adm_in_channels=24)],
                         ids=["sd15-like", "sdxl-like"])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_the_shallow_branch_on_the_same_input_is_the_whole_unet(cfg, depth):
    """Call 1 runs everything and keeps the deep feature; call 2, on the same input, runs only the
    shallow branch on it: the output must be the whole UNet's, to the last bit."""
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor(500.0), torch.randn(2, 7, 16)
    y = torch.randn(2, 24) if cfg.adm_in_channels else None
    cache = DeepCache(interval=2, depth=depth)
    with torch.no_grad():
        whole = unet(x, t, context, y, cache=cache)
        shallow = unet(x, t, context, y, cache=cache)
        again = unet(x, t, context, y)
    assert cache.calls == 2 and cache.feature is not None
    assert torch.equal(whole, again) and torch.equal(shallow, whole)


def test_off_and_interval_one_change_nothing(tiny):
    plain = tiny.generate(PROMPT, seed=4, num_steps=8)
    assert np.array_equal(pixels(plain), pixels(tiny.generate(PROMPT, seed=4, num_steps=8, step_cache=None)))
    assert np.array_equal(pixels(plain), pixels(tiny.generate(PROMPT, seed=4, num_steps=8, step_cache=1)))


def test_a_cached_run_is_deterministic_and_different(tiny):
    a = tiny.generate(PROMPT, seed=4, num_steps=8, step_cache=3)
    b = tiny.generate(PROMPT, seed=4, num_steps=8, step_cache=3)
    plain = tiny.generate(PROMPT, seed=4, num_steps=8)
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(plain)).max() > 0, "the cache was never used"
    assert a.size == plain.size and a.info["sd"]["step_cache"] == {"interval": 3, "depth": 2}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_cached(tiny, sampler):
    image = tiny.generate(PROMPT, seed=1, num_steps=6, sampler=sampler, step_cache=2)
    assert image.size == (64, 64) and np.isfinite(pixels(image)).all()


def test_batches_img2img_and_a_custom_guidance_run_cached(tiny):
    batch = tiny.generate(PROMPT, seed=[1, 2], num_steps=6, step_cache=2)
    alone = tiny.generate(PROMPT, seed=2, num_steps=6, step_cache=2)
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 1
    picture = tiny.generate("a green square", seed=9, num_steps=4)
    assert tiny.generate(PROMPT, image=picture, strength=0.6, seed=1, num_steps=6, step_cache=2).size == (64, 64)
    tiny.generate(PROMPT, seed=1, num_steps=4, step_cache=2, guidance=lambda u, c, s: u + 3 * (c - u))


@pytest.mark.parametrize("value, message", [(0, "step_cache: must be a whole number of at least 1"),
                                            ({"depth": 99}, "step_cache depth: must be a whole number in"),
                                            ({"every": 2}, "step_cache: takes interval and depth, not every")])
def test_bad_step_cache_names_the_rule(tiny, value, message):
    with pytest.raises(sd.InputError, match=message):
        tiny.generate(PROMPT, num_steps=1, step_cache=value)


def call_flops(cfg: UNetConfig, side: int) -> tuple[int, int]:
    """FLOPs of one whole and one shallow CFG-batch UNet call at side x side latents, counted on
    the meta device (no memory, no arithmetic)."""
    with torch.device("meta"), no_weight_init():
        unet = UNet(cfg)
        x, context = torch.empty(2, 4, side, side), torch.empty(2, 77, cfg.context_dim)
        y = torch.empty(2, cfg.adm_in_channels) if cfg.adm_in_channels else None
    t, cache, flops = torch.tensor(500.0, device="meta"), DeepCache(interval=2), []
    for _ in range(2):  # the first call is whole and keeps the feature, the second reuses it
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, context, y, cache=cache)
        flops.append(counter.get_total_flops())
    return flops[0], flops[1]


def shallow_calls(interval: int, calls: int) -> int:
    cache, x = DeepCache(interval=interval), torch.empty(1)
    reused = 0
    for _ in range(calls):
        if cache.reuse(x):
            reused += 1
        else:
            cache.keep(x, x)
    return reused


@pytest.mark.parametrize("cfg, side", [(SD15, 64), (SDXL, 128)], ids=["sd15-512", "sdxl-1024"])
def test_caching_does_measurably_less_work(cfg, side):
    """Counted, not timed, for a 30-step run: with interval N, N - 1 calls in N run only the
    shallow branch (at SD 1.5's full resolution, with its attention: about a fifth of the whole
    UNet). The whole UNet's FLOPs are the bar; each cached run must cost well under it."""
    whole, shallow = call_flops(cfg, side)
    assert 0 < shallow < whole
    steps = 30
    cached = {n: ((steps - shallow_calls(n, steps)) * whole + shallow_calls(n, steps) * shallow) / (steps * whole)
              for n in (2, 3, 5)}
    print(f"[flops] {'SDXL' if cfg is SDXL else 'SD 1.5'}: shallow call / whole = {shallow / whole:.3f}; "
          "30 steps cached / whole = " + ", ".join(f"N={n}: {v:.2f}" for n, v in cached.items()))
    assert shallow_calls(3, steps) == 20 and shallow_calls(1, steps) == 0
    assert cached[2] < 0.7 and cached[3] < 0.55 and cached[5] < 0.45
