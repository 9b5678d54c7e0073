"""Stopping a running generation from outside, within a UNet block or a VAE tile.

Between sampler steps a callback can stop a run, but one step of a big image takes minutes on
a CPU. So the UNet calls `checkpoint()` between its blocks and the VAE between its blocks and
tiles; whoever runs a generation installs a check for its own thread:

    with interruptible(lambda: job_abandoned):
        pipe.generate(...)            # raises Interrupted at the next checkpoint once the check says so

With no check installed (or under torch.compile, where the models must trace into one graph)
`checkpoint()` returns at once: one context-variable read.
"""

import contextlib
import contextvars
from collections.abc import Callable

import torch


class Interrupted(Exception):
    """Raised by `checkpoint()` when the check installed by `interruptible` says stop."""


_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("sd_interrupt_check",
                                                                                   default=None)


@contextlib.contextmanager
def interruptible(should_stop: Callable[[], bool]):
    """Within this block (in this thread or task), `checkpoint()` raises Interrupted once
    `should_stop()` is true."""
    token = _check.set(should_stop)
    try:
        yield
    finally:
        _check.reset(token)


def checkpoint() -> None:
    """Raise Interrupted if the installed check says stop; called between blocks of the models."""
    if torch.compiler.is_compiling():  # traced code keeps no Python calls: a compiled model stops between steps
        return
    should_stop = _check.get()
    if should_stop is not None and should_stop():
        raise Interrupted("stopped at a checkpoint")
