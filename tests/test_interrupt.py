"""sd.interrupt: a generation stops inside the UNet and the VAE (between blocks, between tiles)
once the check its runner installed says so, instead of at the end of a step or a decode.

Under torch.compile the checkpoints must leave one graph: tests/test_compile.py traces the UNet and
the VAE decoder, checkpoints included, with fullgraph=True. (Checked by hand: a checkpoint() that
reads its context variable without first asking torch.compiler.is_compiling() breaks that trace.)"""

import threading

import pytest
import torch

import sd
from sd.interrupt import Interrupted, checkpoint, interruptible
from sd.tiny import CHECKPOINT


@pytest.fixture(scope="module")
def pipe():
    return sd.load(CHECKPOINT, device="cpu")


class TripAfter:
    """A check that says stop on its n-th call, counting the calls."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def unet_inputs(pipe, side=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, side, side, generator=g), torch.tensor([500.0]),
            torch.randn(1, 77, pipe.unet.cfg.context_dim, generator=g))


def test_the_unet_stops_between_its_blocks(pipe):
    check = TripAfter(3)
    with interruptible(check), pytest.raises(Interrupted), torch.inference_mode():
        pipe.unet(*unet_inputs(pipe))
    assert check.calls == 3  # stopped at the third checkpoint, not after the whole forward pass
    # and it counts many checkpoints in one forward pass: the blocks and the transformer blocks
    count = TripAfter(10 ** 9)
    with interruptible(count), torch.inference_mode():
        pipe.unet(*unet_inputs(pipe))
    n_layers = sum(len(b) for b in [*pipe.unet.input_blocks, pipe.unet.middle_block, *pipe.unet.output_blocks])
    assert count.calls > n_layers


def test_generate_stops_inside_its_first_step(pipe):
    steps = []
    with interruptible(lambda: True), pytest.raises(Interrupted):
        pipe.generate("a red circle", num_steps=4, seed=0, callback=steps.append)
    assert steps == []  # no sampler step finished: the stop came from inside the UNet


def test_a_large_attention_runs_in_chunks_that_can_be_stopped(monkeypatch):
    """Past ATTENTION_CHUNK query-key pairs one attention call is minutes of work on a CPU: it
    runs in chunks of query rows, checkpoints between them, with the numbers of one call."""
    from sd import unet
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (300, 200, 200))
    whole = unet.attention(q, k, v)
    monkeypatch.setattr(unet, "ATTENTION_CHUNK", 2 * 4 * 200 * 7)  # 7 query rows a call: 43 calls
    count = TripAfter(10 ** 9)
    with interruptible(count):
        chunked = unet.attention(q, k, v)
    assert count.calls == 43
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    check = TripAfter(5)
    with interruptible(check), pytest.raises(Interrupted):
        unet.attention(q, k, v)
    assert check.calls == 5


@pytest.mark.parametrize("tile", [None, 4])
def test_the_vae_stops_between_its_blocks_and_tiles(pipe, tile):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    check = TripAfter(2)
    with interruptible(check), pytest.raises(Interrupted), torch.inference_mode():
        pipe.vae.decode(z, tile=tile)
    assert check.calls == 2
    check = TripAfter(2)
    with interruptible(check), pytest.raises(Interrupted), torch.inference_mode():
        pipe.vae.encode(torch.zeros(1, 3, 64, 64), tile=tile)
    assert check.calls == 2


def test_no_check_or_a_check_that_never_trips_changes_nothing(pipe):
    args = unet_inputs(pipe)
    with torch.inference_mode():
        plain = pipe.unet(*args)
        with interruptible(lambda: False):
            checked = pipe.unet(*args)
    assert torch.equal(plain, checked)
    checkpoint()  # no check installed: returns


def test_a_check_belongs_to_its_own_thread(pipe):
    """The server's worker thread installs its job's check; another thread's run is not stopped by it."""
    inside, release, outcome = threading.Event(), threading.Event(), []

    def other_thread():
        with interruptible(lambda: True):
            inside.set()
            release.wait()

    t = threading.Thread(target=other_thread)
    t.start()
    inside.wait()
    try:
        with torch.inference_mode():
            outcome.append(pipe.unet(*unet_inputs(pipe)).shape)
    finally:
        release.set()
        t.join()
    assert outcome == [torch.Size([1, 4, 8, 8])]
