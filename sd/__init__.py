"""sd: Stable Diffusion from scratch in plain PyTorch.

    import sd
    pipe = sd.load("weights/v1-5-pruned-emaonly.safetensors")
    pipe.generate("an astronaut riding a horse", seed=0).save("out.png")
"""

from .pipeline import Pipeline, load
from .schedule import SAMPLERS
from .weights import CheckpointError

__all__ = ["load", "Pipeline", "CheckpointError", "SAMPLERS"]
__version__ = "0.1.0"
