"""The model cache: registry models (sd/registry.py) loaded on first use and kept, least recently
used out first, while they fit in memory; and the cheap checks that tell, before anything is
loaded, whether a model's source can be loaded at all (file headers, not weights)."""

import json
import os
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from ..defaults import Defaults
from ..errors import InputError
from ..registry import Registry, WeightsMissing, load_model, spec_of, with_registry_defaults
from .jobs import GenerationJob

MAX_HEADER = 100 * 2 ** 20       # a safetensors header is JSON; SDXL's single file has 0.3 MB of it
UNET_KEYS = ("model.diffusion_model.input_blocks.0.0.weight",  # a full single file
             "input_blocks.0.0.weight", "conv_in.weight")        # a UNet-only file, either naming
FOLDER_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # those a diffusers folder stores weights for


class SourceProblem(Exception):
    """A model's source is on disk but is not something sd.load can read (the reason says why,
    naming the file: for the log, not for clients)."""

    def __init__(self, problem: str, model: str | None = None):
        super().__init__(problem)
        self.model = model


class LoadFailed(Exception):
    """Loading a model whose source looked right failed; the cause is chained."""


# ---------------------------------------------------------------- source checks


def check_source(path: Path) -> None:
    """Raise SourceProblem unless `path` looks loadable: a safetensors file whose header parses,
    whose data the file holds in full and which has a UNet; or a diffusers folder whose
    model_index.json parses and whose parts hold such files. Reads headers only."""
    if path.is_dir():
        _check_folder(path)
    elif path.is_file():
        _check_file(path, unet=True)
    else:
        raise SourceProblem(f"{path}: no such file or folder")


def _check_file(path: Path, unet: bool) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, MAX_HEADER):
            raise SourceProblem(f"{path}: not a safetensors file (no header length in its first 8 bytes)")
        try:
            header = json.loads(f.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise SourceProblem(f"{path}: not a safetensors file (its header is not a tensor table)") from None
    if 8 + length + max(ends, default=0) > size:
        raise SourceProblem(f"{path}: truncated (the header describes {8 + length + max(ends)} bytes, the file "
                            f"has {size}): an interrupted download?")
    if unet and not any(key in header for key in UNET_KEYS):
        raise SourceProblem(f"{path}: holds no UNet (none of {', '.join(UNET_KEYS)})")


def _check_folder(path: Path) -> None:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except FileNotFoundError:
        raise SourceProblem(f"{path}: a folder source must be in the diffusers layout (model_index.json missing)") \
            from None
    except (ValueError, UnicodeDecodeError):
        raise SourceProblem(f"{path}/model_index.json: not JSON") from None
    if not isinstance(index, dict):
        raise SourceProblem(f"{path}/model_index.json: not a JSON object")
    for part in FOLDER_PARTS:
        if part not in index and part != "unet":
            continue
        files = sorted((path / part).glob("*.safetensors"))
        if not files:
            raise SourceProblem(f"{path}/{part}: no .safetensors weights")
        for file in files:
            _check_file(file, unet=False)
        if part == "unet" and not any(_has_unet(file) for file in files):
            raise SourceProblem(f"{path}/unet: holds no UNet (no conv_in.weight)")


def _has_unet(path: Path) -> bool:
    try:
        _check_file(path, unet=True)
        return True
    except SourceProblem:
        return False


# ---------------------------------------------------------------- the cache


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


class ModelCache:
    """Loads registry models on first use and keeps them, least recently used first out, while
    they fit in `max_bytes`. Entries reading the same base file share its text encoders and VAE.
    Loads and evictions come from the worker thread; the checks and states from anywhere."""

    def __init__(self, registry: Registry, device: str | None = None, dtype=None, max_bytes: int | None = None):
        from ..pipeline import default_device
        self.registry, self.device, self.dtype = registry, device or default_device(), dtype
        self.max_bytes = max_bytes if max_bytes is not None else memory_budget(self.device)
        self.pipelines: OrderedDict[str, object] = OrderedDict()
        self.loaded: tuple[str, ...] = ()        # a snapshot of the cache's keys, read without the lock
        self.held_bytes = 0                      # used_bytes() after the last load, read without the lock
        self.failures: dict[str, str] = {}       # model id -> why its last load failed
        self._checked: dict[tuple, str | None] = {}  # (path, mtime, size) -> problem, so headers are read once
        self.lock = threading.Lock()

    # ------------------------------------------------------------ checks, cheap

    def problem(self, model_id: str) -> str | None:
        """Why the model's sources can't be loaded as they are on disk now (None: they can)."""
        if self.registry.missing(model_id):
            return None  # not a problem of the files: there are none yet (WeightsMissing)
        for path in filter(None, self.registry.sources(model_id)):  # the source, and a replacement UNet
            try:
                stat = path.stat()
                key = (str(path), stat.st_mtime_ns, stat.st_size)
                if key not in self._checked:
                    self._checked[key] = None
                    check_source(path)
            except SourceProblem as e:
                self._checked[key] = str(e)
            except OSError as e:
                return f"{path}: {e.strerror}"
            if self._checked[key]:
                return self._checked[key]
        return None

    def missing_message(self, model_id: str) -> str:
        """What a client is told about absent weights (no server paths: the log has those)."""
        if model_id in self.registry.overrides:
            return f"{model_id}: no such file or folder (given with --model)"
        return f"{model_id}: weights missing; fetch them with: sd download {model_id}"

    def check_available(self, model_id: str) -> None:
        """WeightsMissing or SourceProblem unless the model is loaded or its sources look loadable."""
        if model_id in self.loaded:
            return
        if self.registry.missing(model_id):
            raise WeightsMissing(self.missing_message(model_id))
        problem = self.problem(model_id)
        if problem:
            raise SourceProblem(problem, model_id)

    def check(self, job: GenerationJob) -> None:
        """Before a job queues: its model exists, gets the inputs its mode needs, and can load."""
        spec = spec_of(job.model)
        for name in spec.needs:
            if job.kwargs.get(name) is None:
                raise InputError(f"{name}: required by {job.model} ({spec.mode})")
        self.check_available(job.model)

    def defaults(self, model_id: str) -> Defaults:
        """The model's generation defaults: the loaded pipeline's, else the registry's over the
        plain ones, as `with_registry_defaults` sets them (tests/test_models.py holds the two equal)."""
        pipe = self.pipelines.get(model_id)
        if pipe is not None:
            return pipe.defaults
        spec = spec_of(model_id)
        return replace(Defaults(), **spec.defaults, keep_unmasked=spec.keep_unmasked)

    def state(self, model_id: str) -> str:
        """For /healthz: loaded, ready, not downloaded (no weights, none asked for), missing (a --model
        source that isn't there), unreadable or failed to load (the server log says why)."""
        if model_id in self.loaded:
            return "loaded"
        if self.registry.missing(model_id):
            return "missing" if model_id in self.registry.overrides else "not downloaded"
        if self.problem(model_id):
            return "unreadable"
        return "failed to load" if model_id in self.failures else "ready"

    # ------------------------------------------------------------ loading

    def get(self, model_id: str):
        """The model's pipeline, loaded now if it isn't. Raises WeightsMissing, SourceProblem, or
        LoadFailed (the loader's exception chained)."""
        spec = spec_of(model_id)
        with self.lock:
            if model_id in self.pipelines:
                self.pipelines.move_to_end(model_id)
                return self.pipelines[model_id]
            self.check_available(model_id)
            try:
                pipe = self._load(spec)
            except Exception as e:
                self.failures[model_id] = f"{type(e).__name__}: {e}"
                raise LoadFailed(f"{model_id}: the model's weights could not be loaded") from e
            self.failures.pop(model_id, None)
            self.pipelines[model_id] = pipe
            self._evict(keep=model_id)
            self.loaded, self.held_bytes = tuple(self.pipelines), self.used_bytes()
            return pipe

    def _load(self, spec):
        source, unet = self.registry.sources(spec.id)
        for other_id, other in self.pipelines.items():  # share encoders and VAE with a loaded sibling
            if source.is_file() and self.registry.sources(other_id)[0] == source:
                return with_registry_defaults(other.with_unet(unet or source, lightning_steps=spec.lightning_steps),
                                              spec)
        return load_model(spec.id, self.registry, device=self.device, dtype=self.dtype)

    def _evict(self, keep: str):
        while len(self.pipelines) > 1 and self.used_bytes() > self.max_bytes:
            oldest = next(k for k in self.pipelines if k != keep)
            del self.pipelines[oldest]
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()

    def used_bytes(self) -> int:
        """Weights held by the cache, a module shared by several pipelines counted once."""
        unique = {id(m): m for pipe in self.pipelines.values() for m in _modules(pipe)}
        return sum(map(_module_bytes, unique.values()))
