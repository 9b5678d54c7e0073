"""load(compile=True) and what torch.compile needs of the models.

In the suite, dynamo traces the UNet and the VAE decoder with the "eager" backend and
fullgraph=True: each must be one graph (a graph break would cost speed) that computes the
same numbers. Generating with the real compiler (inductor) costs about 90 s of compiling on a
2-core CPU even for the tiny model, so that test runs only with SD_SLOW_TESTS=1.
"""

import os

import numpy as np
import pytest
import torch

import sd
from sd.tiny import CHECKPOINT


@pytest.fixture(scope="module")
def pipe():
    return sd.load(CHECKPOINT, device="cpu")


def test_unet_and_vae_decoder_are_each_one_graph(pipe):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, pipe.unet.cfg.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    z = torch.randn(1, 4, 8, 8, generator=g)
    torch._dynamo.reset()
    with torch.inference_mode():
        for module, args in ((pipe.unet, (x, t, context)), (pipe.vae.decoder, (z,))):
            traced = torch.compile(module, backend="eager", fullgraph=True)  # raises on a graph break
            torch.testing.assert_close(traced(*args), module(*args), rtol=1e-5, atol=1e-5)


def test_compile_true_wraps_the_unet_and_the_vae_decoder():
    compiled = sd.load(CHECKPOINT, device="cpu", compile=True)
    assert compiled.unet._compiled_call_impl is not None and compiled.vae.decoder._compiled_call_impl is not None
    assert sd.load(CHECKPOINT, device="cpu").unet._compiled_call_impl is None


@pytest.mark.skipif(not os.environ.get("SD_SLOW_TESTS"), reason="about 90 s of compiling; set SD_SLOW_TESTS=1")
def test_compiled_generate_gives_the_same_image(pipe):
    """Inductor fuses and reorders float32 arithmetic, so the images may differ by a level."""
    compiled = sd.load(CHECKPOINT, device="cpu", compile=True)
    a = np.asarray(compiled.generate("a red circle on the left", seed=0, num_steps=4), dtype=int)
    b = np.asarray(pipe.generate("a red circle on the left", seed=0, num_steps=4), dtype=int)
    assert np.abs(a - b).max() <= 2
