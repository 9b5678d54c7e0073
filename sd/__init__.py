"""sd: Stable Diffusion from scratch in plain PyTorch.

    import sd
    pipe = sd.load("weights/v1-5-pruned-emaonly.safetensors")
    pipe.generate("an astronaut riding a horse", seed=0).save("out.png")
"""

from .errors import InputError
from .pipeline import Latents, Pipeline, load
from .samplers import SAMPLERS, Step, register
from .writer import save
from .schedule import SCHEDULES
from .weights import CheckpointError

__all__ = ["load", "save", "Pipeline", "Latents", "InputError", "CheckpointError", "SAMPLERS", "SCHEDULES", "Step",
           "register"]
__version__ = "0.1.0"
