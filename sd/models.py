"""A memory-bounded cache of registry models (sd/registry.py), loaded on first use."""

import os
import threading
from collections import OrderedDict

import torch
from PIL import Image

from .api import MAX_SIDE  # the API's limit on width and height
from .errors import InputError
from .images import read_image
from .registry import (DEFAULT_MODEL, REGISTRY, ModelSpec, Registry, UnknownModel, WeightsMissing,  # noqa: F401
                       default_weights_dir, download, load_model, parse_overrides, spec_of, with_registry_defaults)


def _modules(pipe) -> list:
    return [pipe.unet, pipe.vae, *pipe.text_encoders]


def _module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def pipeline_bytes(pipe) -> int:
    """The memory a pipeline's weights take, counting each module it holds."""
    return sum(map(_module_bytes, _modules(pipe)))


def memory_budget(device: str) -> int:
    """How much the cache may hold: 80% of the GPU's memory, or of the machine's RAM."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class Models:
    """Loads registry models on first use and keeps them, least recently used first out, while
    they fit in `max_bytes`. Entries reading the same base file share its text encoders and VAE."""

    def __init__(self, registry: Registry, device: str | None = None, dtype=None, max_bytes: int | None = None):
        from .pipeline import default_device
        self.registry, self.device, self.dtype = registry, device or default_device(), dtype
        self.max_bytes = max_bytes if max_bytes is not None else memory_budget(self.device)
        self.cache: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()  # loads and evictions come from the worker; status from anywhere

    def get(self, model_id: str):
        spec = spec_of(model_id)
        with self.lock:
            if model_id in self.cache:
                self.cache.move_to_end(model_id)
                return self.cache[model_id]
            if self.registry.missing(model_id):
                raise WeightsMissing(self.registry.missing_message(model_id))
            pipe = self._load(spec)
            self.cache[model_id] = pipe
            self._evict(keep=model_id)
            return pipe

    def _load(self, spec: ModelSpec):
        source, unet = self.registry.sources(spec.id)
        for other_id, other in self.cache.items():  # share encoders and VAE with a loaded sibling
            if source.is_file() and self.registry.sources(other_id)[0] == source:
                return with_registry_defaults(other.with_unet(unet or source, lightning_steps=spec.lightning_steps),
                                              spec)
        return load_model(spec.id, self.registry, device=self.device, dtype=self.dtype)

    def _evict(self, keep: str):
        while len(self.cache) > 1 and self.used_bytes() > self.max_bytes:
            oldest = next(k for k in self.cache if k != keep)
            del self.cache[oldest]
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()

    def used_bytes(self) -> int:
        """Weights held by the cache, a module shared by several pipelines counted once."""
        unique = {id(m): m for pipe in self.cache.values() for m in _modules(pipe)}
        return sum(map(_module_bytes, unique.values()))

    def generate(self, model_id: str, prompt: str, *, image=None, mask=None, width=None, height=None,
                 **settings) -> Image.Image:
        """generate() with the model's defaults for what the request leaves out; with an image,
        omitted sides come from it, scaled down to fit the API's 2048 limit."""
        spec = spec_of(model_id)
        for name, value in (("image", image), ("mask", mask)):
            if name in spec.needs and value is None:
                raise InputError(f"{name}: required by {model_id} ({spec.mode})")
        image = read_image(image, "image") if image is not None else None
        mask = read_image(mask, "mask") if mask is not None else None
        if image is not None and (width is None or height is None):
            scale = min(1.0, MAX_SIDE / max(image.size))
            if scale < 1:
                w, h = (max(8, int(v * scale) // 8 * 8) for v in image.size)
                width, height = width or w, height or h
        return self.get(model_id).generate(prompt, image=image, mask=mask, width=width, height=height, **settings)


