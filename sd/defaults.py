"""A model's generation defaults, as one frozen object.

The checkpoint gives the first (its scheduler, its size, a preset), and each layer above makes
a new one with `dataclasses.replace`: a Lightning UNet, LCM, the Workers AI registry. A
request's own settings then win field by field in `Pipeline.generate`.
"""

from dataclasses import dataclass, replace

from .samplers import twin_of

LCM_STEPS = 4            # as diffusers' LatentConsistencyModelPipeline
# LCM-distilled UNets take the guidance scale as an input (diffusers' LCM pipeline default);
# LCM-LoRA-fused models work best with little or no CFG (LCM-LoRA's model cards: 1 to 2).
LCM_GUIDANCE = {"distilled": 8.5, "lora": 1.0}
# A folder's scheduler flags that respace its sigmas -> our schedule of that name.
SCHEDULE_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
                  "use_beta_sigmas": "beta"}


@dataclass(frozen=True)
class Defaults:
    width: int = 512
    height: int = 512
    num_steps: int = 50            # as diffusers' StableDiffusionPipeline
    guidance: float = 7.5
    sampler: str = "euler"         # a plain single file has no scheduler: Euler
    schedule: str = "default"      # the sampler's own (its diffusers twin's) timesteps
    strength: float = 0.8          # img2img, as diffusers' img2img pipeline
    inpaint_strength: float = 1.0  # as diffusers' inpainting pipeline
    keep_unmasked: bool = False
    clip_skip: int | None = None
    prompt_style: str = "plain"

    def strength_for(self, inpainting: bool) -> float:
        return self.inpaint_strength if inpainting else self.strength


def from_checkpoint(scheduler_class: str | None, scheduler: dict, sample_size: int, distilled: bool,
                    preset: dict) -> Defaults:
    """What a checkpoint implies: the sampler of its scheduler class (Euler on its schedule for
    a class we don't implement), its size, LCM's few steps, then a preset (sd/tiny.py)."""
    sampler = twin_of(scheduler_class, scheduler) or "euler"
    schedule = next((name for flag, name in SCHEDULE_FLAGS.items() if scheduler.get(flag)), "default")
    defaults = Defaults(width=sample_size, height=sample_size, sampler=sampler, schedule=schedule)
    if sampler == "lcm":
        defaults = for_lcm(defaults, distilled)
    return replace(defaults, **preset)


def for_lcm(defaults: Defaults, distilled: bool) -> Defaults:
    return replace(defaults, num_steps=LCM_STEPS, guidance=LCM_GUIDANCE["distilled" if distilled else "lora"])


def for_lightning(defaults: Defaults, steps: int) -> Defaults:
    """SDXL-Lightning (Lin et al. 2024): Euler, no CFG, the step count the UNet was distilled for."""
    return replace(defaults, sampler="euler", schedule="default", num_steps=steps, guidance=0.0)
