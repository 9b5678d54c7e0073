"""The tiny shapes model shipped with the package (trained by scripts/train_tiny.py on sd/shapes.py).

It is an ordinary SD 1.5-layout single file, read by `sd.load` like any other checkpoint.
Its safetensors metadata names this preset, which adds what the tensors cannot say: it
was trained at 64x64, and these sampling defaults suit it.
"""

from dataclasses import replace

from .tokenizer import ASSETS

CHECKPOINT = ASSETS / "tiny-shapes.safetensors"
PRESET_KEY, PRESET_NAME = "sd.preset", "tiny-shapes"
SAMPLE_SIZE = 64
DEFAULTS = {"sampler": "dpmpp_2m", "num_steps": 20, "guidance": 4.0}


def apply_preset(checkpoint, metadata: dict[str, str], source):
    """`checkpoint` with the size and sampling defaults of the preset its file's metadata
    names; unchanged when it names none."""
    name = metadata.get(PRESET_KEY)
    if name is None:
        return checkpoint
    if name != PRESET_NAME:
        raise ValueError(f"{source}: metadata {PRESET_KEY}={name!r} names no known preset (known: {PRESET_NAME})")
    return replace(checkpoint, sample_size=SAMPLE_SIZE, defaults=DEFAULTS, preset=name)
