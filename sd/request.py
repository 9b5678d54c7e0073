"""The settings of one `generate` call: checked and completed with the model's defaults before
any slow work, each error naming the argument and the rule."""

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .defaults import Defaults
from .errors import InputError
from .prompts import STYLES
from .samplers import SamplerSpec, resolve
from .schedule import check_schedule, check_sigmas

MAX_GUIDANCE = 100      # the Workers AI schema's bound; far past it every pixel saturates
MAX_SEED = 2 ** 64 - 1
OUTPUTS = ("pil", "latent")


@dataclass(frozen=True)
class Request:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str | None, ...]
    seeds: tuple[int, ...]
    width: int
    height: int
    num_steps: int
    guidance: float | Callable
    guidance_rescale: float
    sampler: str | Callable
    schedule: str
    sigmas: tuple[float, ...] | None
    sampler_options: dict = field(default_factory=dict)
    strength: float | None = None
    keep_unmasked: bool = False
    clip_skip: int | None = None
    prompt_style: str = "plain"
    sizes: tuple[int, ...] | None = None     # SDXL's six size / crop numbers
    batched: bool = False                    # give a list back
    output: str = "pil"
    inpainting: bool = False
    step_cache: tuple[int, int] | None = None  # DeepCache's (interval, depth)

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    def settings(self, k: int) -> dict:
        """Image k's settings, JSON-ready: what reproduces it."""
        s = dict(prompt=self.prompts[k], negative_prompt=self.negative_prompts[k], width=self.width,
                 height=self.height, num_steps=self.num_steps, guidance=_name(self.guidance), seed=self.seeds[k],
                 sampler=_name(self.sampler), schedule=self.schedule)
        optional = dict(sigmas=list(self.sigmas) if self.sigmas else None, sampler_options=self.sampler_options,
                        step_cache=dict(zip(("interval", "depth"), self.step_cache)) if self.step_cache else None,
                        guidance_rescale=self.guidance_rescale, strength=self.strength, clip_skip=self.clip_skip,
                        prompt_style=None if self.prompt_style == "plain" else self.prompt_style)
        s.update({k: v for k, v in optional.items() if v})
        if self.strength is not None:
            s["strength"] = self.strength
        if self.inpainting:
            s["keep_unmasked"] = self.keep_unmasked
        if self.sizes:
            s.update(original_size=self.sizes[:2], crop_top_left=self.sizes[2:4], target_size=self.sizes[4:])
        return s


def _name(value):
    return getattr(value, "__name__", "custom") if callable(value) else value


def _number(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InputError(f"{name}: must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _whole(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        rule = f"in [{low}, {high}]" if high is not None else f"of at least {low}"
        raise InputError(f"{name}: must be a whole number {rule}, got {value!r}")
    return value


def _texts(name, value, optional=False) -> list | None:
    if value is None and optional:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise InputError(f"{name}: must be a string or a list of strings, got {value!r}")
    return list(values)


def batch_of(prompt, negative_prompt, seed, num_images) -> tuple[list, list, list, bool]:
    """Prompts, negative prompts and seeds, one per image. The batch size is num_images, or the
    length of a prompt list or seed list; those given must agree. A single seed s with
    num_images N gives s, s+1, ..., s+N-1 (as A1111); no seed gives random consecutive ones."""
    prompts = _texts("prompt", prompt)
    negatives = _texts("negative_prompt", negative_prompt, optional=True)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    sizes = {"num_images": _whole("num_images", num_images, 1) if num_images is not None else None,
             "prompt": len(prompts) if isinstance(prompt, (list, tuple)) else None,
             "negative_prompt": len(negatives) if isinstance(negative_prompt, (list, tuple)) else None,
             "seed": len(seeds) if seeds is not None else None}
    given = {k: v for k, v in sizes.items() if v is not None}
    if len(set(given.values())) > 1:
        raise InputError("num_images / prompt / negative_prompt / seed: the batch sizes they give differ: "
                         + ", ".join(f"{k} {v}" for k, v in given.items()))
    n = next(iter(given.values()), 1)
    if seeds is None:
        first = random.randrange(2 ** 32) if seed is None else _whole("seed", seed, 0, MAX_SEED)
        seeds = [(first + k) % (MAX_SEED + 1) for k in range(n)]
    for s in seeds:
        _whole("seed", s, 0, MAX_SEED)
    prompts = prompts * n if len(prompts) == 1 else prompts
    negatives = [None] * n if negatives is None else (negatives * n if len(negatives) == 1 else negatives)
    return prompts, negatives, seeds, bool(given)


def check(defaults: Defaults, *, multiple: int, sdxl: bool, has_image: bool, has_mask: bool,
          prompt, negative_prompt=None, num_images=None, width=None, height=None, num_steps=None, guidance=None,
          guidance_rescale=0.0, seed=None, sampler=None, schedule=None, sigmas=None, sampler_options=None,
          strength=None, keep_unmasked=None, clip_skip=None, prompt_style=None, original_size=None,
          crop_top_left=(0, 0), target_size=None, output="pil", step_cache=None, max_cache_depth=None) -> Request:
    prompts, negatives, seeds, batched = batch_of(prompt, negative_prompt, seed, num_images)
    width, height = (defaults.width if width is None else width), (defaults.height if height is None else height)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise InputError(f"{name}: must be a positive multiple of {multiple}, got {value!r}")
    num_steps = _whole("num_steps", defaults.num_steps if num_steps is None else num_steps, 1)
    guidance = defaults.guidance if guidance is None else guidance
    if not callable(guidance):
        guidance = _number("guidance", guidance, 0, MAX_GUIDANCE)
    guidance_rescale = _number("guidance_rescale", guidance_rescale, 0, 1)
    name, options = sampler or defaults.sampler, dict(sampler_options or {})
    if not isinstance(options, dict):
        raise InputError(f"sampler_options: must be a dict of option names to values, got {sampler_options!r}")
    if callable(name):  # a sampler of one's own runs on the Euler family's timesteps
        spec, implied = SamplerSpec(_name(name), name, "euler", None), None
    elif isinstance(name, str):
        spec, implied = resolve(name)
    else:
        raise InputError(f"sampler: must be a sampler's name or a sampler function, got {name!r}")
    options = spec.check_options(options)
    if implied and schedule not in (None, implied):
        raise InputError(f"schedule: {name} is {spec.name} on the {implied} schedule; it takes no other")
    schedule = check_schedule(implied or schedule or defaults.schedule)
    if sigmas is not None:
        sigmas = tuple(float(s) for s in check_sigmas(sigmas))
    if has_mask and not has_image:
        raise InputError("mask: needs an image to inpaint (pass image= as well)")
    if strength is not None and not has_image:
        raise InputError("strength: only applies with an image (img2img or inpainting)")
    if has_image:
        strength = _number("strength", defaults.strength_for(has_mask) if strength is None else strength, 0, 1)
    if keep_unmasked is None:
        keep_unmasked = defaults.keep_unmasked and has_mask
    if not isinstance(keep_unmasked, bool):
        raise InputError(f"keep_unmasked: must be true or false, got {keep_unmasked!r}")
    if keep_unmasked and not has_mask:
        raise InputError("keep_unmasked: only applies to inpainting (pass a mask)")
    clip_skip = defaults.clip_skip if clip_skip is None else _whole("clip_skip", clip_skip, 0)
    prompt_style = defaults.prompt_style if prompt_style is None else prompt_style
    if prompt_style not in STYLES:
        raise InputError(f"prompt_style: {prompt_style!r} is not one of {', '.join(STYLES)}")
    if output not in OUTPUTS:
        raise InputError(f"output: {output!r} is not one of {', '.join(OUTPUTS)}")
    sizes = _sizes(sdxl, original_size, crop_top_left, target_size, height, width)
    return Request(tuple(prompts), tuple(negatives), tuple(seeds), width, height, num_steps, guidance,
                   guidance_rescale, name, schedule, sigmas, options, strength, keep_unmasked, clip_skip,
                   prompt_style, sizes, batched, output, has_mask, _step_cache(step_cache, max_cache_depth))


def _step_cache(value, max_depth) -> tuple[int, int] | None:
    """step_cache=N (every N-th UNet call whole, DeepCache's default branch) or
    {"interval": N, "depth": d} -> (N, d); None: off."""
    if value is None:
        return None
    settings = {"interval": value} if not isinstance(value, dict) else dict(value)
    unknown = set(settings) - {"interval", "depth"}
    if unknown:
        raise InputError(f"step_cache: takes interval and depth, not {', '.join(sorted(unknown))}")
    interval = _whole("step_cache", settings["interval"], 1) if "interval" in settings else 3
    depth = _whole("step_cache depth", settings.get("depth", 2), 1, max_depth)
    return interval, depth


def _sizes(sdxl, original_size, crop_top_left, target_size, h, w) -> tuple[int, ...] | None:
    if not sdxl:
        if original_size is not None or target_size is not None or tuple(crop_top_left) != (0, 0):
            raise InputError("original_size / crop_top_left / target_size: only SDXL models take size conditioning")
        return None
    values = {"original_size": original_size or (h, w), "crop_top_left": crop_top_left,
              "target_size": target_size or (h, w)}
    for name, pair in values.items():
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(v, int) and 0 <= v <= 16384 for v in pair)):
            raise InputError(f"{name}: must be two whole numbers in [0, 16384], got {pair!r}")
    return tuple(v for pair in values.values() for v in pair)
