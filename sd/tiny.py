"""The tiny shapes model shipped with the package (trained by scripts/train_tiny.py on sd/shapes.py).

It is an ordinary SD 1.5-layout single file, read by `sd.load` like any other checkpoint.
Its safetensors metadata names this preset, which adds what the tensors cannot say: it
was trained at 64x64, and these sampling defaults suit it.
"""

from .tokenizer import ASSETS

CHECKPOINT = ASSETS / "tiny-shapes.safetensors"
PRESET_KEY, PRESET_NAME = "sd.preset", "tiny-shapes"
SAMPLE_SIZE = 64
DEFAULTS = {"default_sampler": "dpmpp_2m", "default_steps": 20, "default_guidance": 4.0}


def apply_preset(pipe, metadata: dict[str, str], source) -> None:
    """Give `pipe` the preset its file's metadata names, if any."""
    name = metadata.get(PRESET_KEY)
    if name is None:
        return
    if name != PRESET_NAME:
        raise ValueError(f"{source}: metadata {PRESET_KEY}={name!r} names no known preset (known: {PRESET_NAME})")
    pipe.sample_size = SAMPLE_SIZE
    for attr, value in DEFAULTS.items():
        setattr(pipe, attr, value)
    pipe._own_defaults = (pipe.schedule_config, pipe.default_sampler, pipe.default_steps, pipe.default_guidance)
