"""LoRA (Hu et al. 2021): low-rank changes to a model's weights, merged into them.

For each layer it changes, a LoRA file stores two factors, `down` (rank x in) and `up` (out x rank),
and often `alpha`: the weight becomes W + scale * alpha / rank * up @ down. For a convolution (LoCon)
`down` is a k x k kernel and `up` a 1 x 1 one, so `up` mixes every tap of `down`; LyCORIS' Tucker
form puts a k x k `mid` between a 1 x 1 `down` and `up`.

Two layouts are read:
- kohya-ss: `lora_unet_<layer>`, `lora_te_<layer>` (SDXL: `lora_te1_`, `lora_te2_`), the layer's
  path with `_` for `.`, then `.lora_down.weight`, `.lora_up.weight`, `.alpha` (missing or 0:
  alpha = rank). UNet layers are named as in diffusers (SD 1.5 files) or as in the single file
  (SDXL files); text encoders in Hugging Face names, SDXL's bigG included.
- diffusers / PEFT: `unet.<layer>`, `text_encoder.<layer>`, `text_encoder_2.<layer>`, then
  `.lora_A.weight` / `.lora_B.weight` (or the older `.lora.down.weight` / `.lora_linear_layer.down.weight`),
  alpha from the `lora_adapter_metadata` diffusers writes into the file (none: alpha = rank).

Merged, not hooked in, so a LoRA costs nothing per step. A changed weight is recomputed from the
weight as loaded: original + the sum of every loaded LoRA's change, in float32, cast once to the
weight's dtype, and put in as a new tensor. The original tensor object is kept, so unloading puts
it back bit for bit, and a weight memory-mapped from its file is never written. The price: while a
LoRA is loaded, each weight it changes is held twice (a weight still mapped from its file, as a
float32 model on the CPU is, costs page cache rather than memory of its own).
"""

import json
import math
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import InputError
from .tensorfile import CheckpointError, StateDict, read_metadata, read_safetensors
from .weights import UNET_TOP, unet_from_diffusers


class LoraError(InputError, CheckpointError):
    """A LoRA that does not fit the model, or of a kind sd does not merge: the message lists the
    tensors it could not place and why."""


UNET, TEXT, TEXT_2 = "UNet", "text encoder", "second text encoder"
# Key prefix -> the model it changes; its name in diffusers' lora_adapter_metadata.
PARTS = {"lora_unet_": (UNET, "unet"), "lora_te_": (TEXT, "text_encoder"), "lora_te1_": (TEXT, "text_encoder"),
         "lora_te2_": (TEXT_2, "text_encoder_2"), "unet.": (UNET, "unet"), "text_encoder.": (TEXT, "text_encoder"),
         "text_encoder_2.": (TEXT_2, "text_encoder_2")}
# Key suffix -> the tensor's role: kohya's, PEFT's, then older diffusers names for the same.
ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
         ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
         ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}
# Other kinds of network files: refused by name, never half applied.
UNSUPPORTED = {
    "LoHa (LyCORIS Hadamard product, hada_*)": r"\.hada_",
    "LoKr (LyCORIS Kronecker product, lokr_*)": r"\.lokr_",
    "DoRA (weight-decomposed LoRA, dora_scale / lora_magnitude_vector)": r"\.(dora_scale|lora_magnitude_vector)",
    "(IA)^3 (on_input)": r"\.on_input$",
    "GLoRA (a1 / a2 / b1 / b2)": r"\.[ab][12]\.weight$",
    "OFT / BOFT (oft_*)": r"\.b?oft_",
    "full weight differences (LyCORIS diff / diff_b)": r"\.diff(_b)?$",
    "norm-layer changes (LyCORIS w_norm / b_norm)": r"\.[wb]_norm$",
    "LoRA biases (PEFT lora_bias: lora_B.bias)": r"\.lora_B\.bias$",
    "bundled textual-inversion embeddings (bundle_emb.*)": r"^bundle_emb\.",
    "diffusers' old attention-processor layout (to_q_lora.down ...)": r"_lora\.(down|up)\.weight$",
}
# The width of the text a UNet's cross-attention reads tells the model family.
CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
FAMILY_NAMES = {"sd15": "SD 1.5", "sd15_inpaint": "SD 1.5 inpainting", "sdxl": "SDXL"}


# ---------------------------------------------------------------- the arguments

def check_scale(scale, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"{name}: a LoRA's scale must be a finite number, got {scale!r}")
    return float(scale)


def lora_entries(loras, name: str = "loras") -> list[tuple[Path, float]]:
    """sd.load's `loras=`: paths, or (path, scale) pairs, checked before any weights are read."""
    if loras is None:
        return []
    if isinstance(loras, (str, Path)) or not isinstance(loras, (list, tuple)):
        raise InputError(f"{name}: must be a list of paths or (path, scale) pairs, got {loras!r}")
    entries = []
    for entry in loras:
        if isinstance(entry, (str, Path)):
            path, scale = entry, 1.0
        elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (str, Path)):
            path, scale = entry
        else:
            raise InputError(f"{name}: each entry must be a path or a (path, scale) pair, got {entry!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name}: {path}: no such LoRA file")
        entries.append((Path(path), check_scale(scale, f"{name}: {path}: scale")))
    return entries


def parse_lora_flag(text: str) -> tuple[Path, float]:
    """The CLI's `--lora FILE[:SCALE]` -> (path, scale 1 when not given). A path holding ':' itself
    (C:\\...) is taken whole when what follows its last ':' is not a number."""
    path, sep, tail = text.rpartition(":")
    try:
        scale = float(tail) if sep else 1.0
    except ValueError:
        sep = ""
    if not sep:
        path, scale = text, 1.0
    if not Path(path).is_file():
        raise FileNotFoundError(f"--lora: {path}: no such LoRA file (expected FILE[:SCALE], got {text!r})")
    return Path(path), check_scale(scale, "--lora: SCALE")


# ---------------------------------------------------------------- reading a file

@dataclass
class Layer:
    """One layer's tensors in a LoRA file: `down`, `up`, maybe `mid` and `alpha`."""
    name: str        # as the file names it: its keys less the role
    part: str        # UNET, TEXT or TEXT_2
    path: str        # the name less the part's prefix
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    peft_config: dict = field(default_factory=dict)  # diffusers' metadata for this part (alpha, rsLoRA)


@dataclass(frozen=True)
class Change:
    """One LoRA's change to one weight: scale * up @ [mid @] down, in the weight's shape."""
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None
    scale: float

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The change in float32, on the weight's device."""
        up, down = (t.to(weight.device, torch.float32).flatten(1) for t in (self.up, self.down))
        if self.mid is None:
            change = up @ down  # (out, in * kh * kw): up mixes each tap of down
        else:  # Tucker: 1x1 down, k x k mid, 1x1 up
            change = torch.einsum("os,srhw,ri->oihw", up, self.mid.to(weight.device, torch.float32), down)
        return (change * self.scale).reshape(weight.shape)

    def misfit(self, shape: tuple[int, ...], layer: str) -> str | None:
        """Why this change cannot go into `layer`, whose weight has `shape`; None when it can."""
        rank_in = self.mid.shape[0] if self.mid is not None else self.down.shape[0]
        chained = self.up.flatten(1).shape[1] == rank_in and (self.mid is None or (
            self.mid.shape[1] == self.down.shape[0] and all(k == 1 for k in self.down.shape[2:])))
        if not chained:
            mid = f", mid {tuple(self.mid.shape)}" if self.mid is not None else ""
            return f"factors that do not chain (up {tuple(self.up.shape)}, down {tuple(self.down.shape)}{mid})"
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        made = (self.up.shape[0], self.down.shape[1], *kernel)
        if _squeezed(made) != _squeezed(shape):
            return f"makes a change of shape {made} for {layer} of shape {shape}"
        return None


def read_layers(state: StateDict, metadata: dict) -> tuple[list[Layer], list[str]]:
    """The file's tensors grouped by layer, and the keys that fit no layer."""
    peft = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    layers: dict[tuple[str, str], Layer] = {}
    stray = []
    for key, tensor in state.items():
        prefix = next((p for p in PARTS if key.startswith(p)), None)
        suffix = next((s for s in ROLES if key.endswith(s)), None)
        if prefix is None or suffix is None:
            stray.append(key)
            continue
        part, meta_name = PARTS[prefix]
        path = key[len(prefix):-len(suffix)]
        config = {k[len(meta_name) + 1:]: v for k, v in peft.items() if k.startswith(meta_name + ".")}
        layer = layers.setdefault((part, path), Layer(key[:-len(suffix)], part, path, peft_config=config))
        layer.tensors[ROLES[suffix]] = tensor
    return list(layers.values()), stray


def alpha_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """alpha / rank, kohya's and PEFT's scale (rsLoRA: alpha / sqrt(rank)); no alpha, or kohya's
    alpha 0, means alpha = rank."""
    alpha = rank if not alpha else alpha
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def layer_scale(layer: Layer) -> float:
    rank = layer.tensors["down"].shape[0]
    if "alpha" in layer.tensors:
        return alpha_scale(layer.tensors["alpha"].float().item(), rank)
    config = layer.peft_config
    alpha = config.get("lora_alpha")
    # PEFT's rule: the first pattern that matches the end of the layer's dotted path.
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer.path):
            alpha = value
            break
    return alpha_scale(alpha, rank, bool(config.get("use_rslora")))


# ---------------------------------------------------------------- finding each layer in our models

def underscored(model: nn.Module) -> dict[str, str]:
    """Our linear and convolution layers by their names with `_` for `.`: kohya's form, in which
    a name cannot be split back into its parts, only matched whole."""
    return {name.replace(".", "_"): name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


DIFFUSERS_TOP = {k.replace(".", "_"): k for k in UNET_TOP}
# The dots of a diffusers UNet path that `unet_from_diffusers` reads; the rest may stay underscored.
DIFFUSERS_BLOCK = re.compile(r"^((?:down|up)_blocks_\d+|mid_block)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")


def diffusers_dots(path: str) -> str:
    """kohya's `down_blocks_1_attentions_0_proj_in` -> `down_blocks.1.attentions.0.proj_in`."""
    if path in DIFFUSERS_TOP:
        return DIFFUSERS_TOP[path]
    return DIFFUSERS_BLOCK.sub(lambda m: f"{m[1].replace('blocks_', 'blocks.')}.{m[2]}.{m[3]}.", path)


def unet_layers(paths: list[str], unet: nn.Module) -> dict[str, str]:
    """File path -> our UNet layer: single-file names directly, diffusers names (dotted or
    kohya's underscored) through the diffusers -> single-file rule table."""
    ours = underscored(unet)
    found = {p: ours[p.replace(".", "_")] for p in paths if p.replace(".", "_") in ours}
    diffusers = {(p if "." in p else diffusers_dots(p)) + ".weight": p for p in paths if p not in found}
    for key, path in unet_from_diffusers(diffusers, unet.cfg).items():
        name = ours.get(key.removesuffix(".weight").replace(".", "_"))
        if name is not None:
            found[path] = name
    return found


def text_layers(paths: list[str], encoder: nn.Module) -> dict[str, str]:
    """File path -> our text encoder layer (Hugging Face names, with or without `text_model.`)."""
    ours = underscored(encoder)
    return {p: ours[u] for p in paths if (u := p.replace(".", "_").removeprefix("text_model_")) in ours}


def made_for(layers: list[Layer], unet: nn.Module, has_second_text: bool) -> str:
    """What the file's own shapes say about the model it was made for, when that is not this one."""
    clues = []
    if not has_second_text and any(layer.part == TEXT_2 for layer in layers):
        clues.append("it changes a second text encoder, as SDXL LoRAs do")
    widths = {layer.tensors["down"].shape[1] for layer in layers if layer.part == UNET and "down" in layer.tensors
              and re.search(r"attn2[._]to_[kv]$", layer.path)}
    ours = unet.cfg.context_dim
    for width in sorted(widths - {ours}):
        family = f" ({CONTEXT_WIDTHS[width]})" if width in CONTEXT_WIDTHS else ""
        clues.append(f"its cross-attention reads {width}-wide text{family}, this model's {ours}-wide")
    return f"\nIt looks made for another model: {'; '.join(clues)}." if clues else ""


# ---------------------------------------------------------------- merging

class Merged:
    """The LoRA changes merged into one model, and its weights as loaded, to recompute from and
    to put back."""

    def __init__(self):
        self.originals: dict[str, nn.Parameter] = {}
        self.changes: dict[str, list[Change]] = {}


# Kept beside the models rather than in a pipeline: pipelines made by with_defaults / lightning /
# with_unet share modules, and what is merged into a module is a fact about the module.
_MERGED: "weakref.WeakKeyDictionary[nn.Module, Merged]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def merge(model: nn.Module, changes: dict[str, Change]) -> None:
    """Put `changes` (layer name -> change) into `model`: each changed weight becomes its original
    plus all its changes so far, summed in float32 and cast once."""
    merged = _MERGED.setdefault(model, Merged())
    modules = dict(model.named_modules())
    for name, change in changes.items():
        module = modules[name]
        original = merged.originals.setdefault(name, module.weight)
        merged.changes.setdefault(name, []).append(change)
        total = sum(c.delta(original) for c in merged.changes[name])
        weight = (original.float() + total).to(original.dtype)
        module.weight = nn.Parameter(weight, requires_grad=original.requires_grad)


@torch.no_grad()
def unload(models: list[nn.Module]) -> None:
    """Put back the weights as loaded, the very tensors, in every model given."""
    for model in models:
        merged = _MERGED.pop(model, None)
        if merged is not None:
            modules = dict(model.named_modules())
            for name, original in merged.originals.items():
                modules[name].weight = original


def apply(unet: nn.Module, text_encoders: list[nn.Module], source: "str | Path | StateDict", scale: float = 1.0,
          family: str = "") -> None:
    """Merge the LoRA at `source` (a .safetensors path, or its tensors as a dict) into these models,
    its changes times `scale`. Every tensor of the file must find its layer, or nothing is merged
    and a LoraError lists those that did not."""
    scale = check_scale(scale)
    state, metadata, label = read(source)
    for kind, pattern in UNSUPPORTED.items():
        if key := next((k for k in state if re.search(pattern, k)), None):
            raise LoraError(f"{label}: {kind} is not supported, only LoRA and LoCon (lora_down / lora_up or "
                            f"lora_A / lora_B pairs); it has {key}")
    layers, stray = read_layers(state, metadata)
    models = {UNET: unet, TEXT: text_encoders[0], TEXT_2: text_encoders[1] if len(text_encoders) > 1 else None}
    problems = [(key, "not a LoRA tensor name (kohya lora_unet_ / lora_te*_ or diffusers unet. / text_encoder*. "
                 "with lora_down / lora_up / lora_A / lora_B / alpha)") for key in stray]
    changes, unplaced = {}, len(stray)
    for part, model in models.items():
        mine = [layer for layer in layers if layer.part == part]
        if mine and model is None:  # one line for them all, first: the likeliest reason for the rest
            more = f" and {len(mine) - 1} more" if len(mine) > 1 else ""
            layers_of = f"{len(mine)} layer{'s' if len(mine) > 1 else ''} of a {part}"
            problems.insert(0, (mine[0].name + more, f"{layers_of}, and this model has one text encoder"))
            unplaced += len(mine)
        elif mine:
            changes[part], part_problems = place(mine, part, model, scale)
            problems += part_problems
            unplaced += len(part_problems)
    if problems:
        listed = "\n  ".join(f"{key}: {why}" for key, why in problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        model = f"this {FAMILY_NAMES.get(family, family)} model" if family else "this model"
        raise LoraError(f"{label}: {unplaced} of its {len(layers) + len(stray)} layers could not be placed in {model}, "
                        f"so none is applied:\n  {listed}{more}"
                        + made_for(layers, unet, models[TEXT_2] is not None))
    for part, part_changes in changes.items():
        merge(models[part], part_changes)


def read(source: "str | Path | StateDict") -> tuple[StateDict, dict, str]:
    """(tensors, metadata, how messages name it); a file's tensors stay memory-mapped, as stored."""
    if isinstance(source, dict):
        return source, {}, "the LoRA"
    if not Path(source).is_file():
        raise FileNotFoundError(f"lora: {source}: no such LoRA file")
    return read_safetensors(source), read_metadata(source), f"lora {source}"


def place(layers: list[Layer], part: str, model: nn.Module, scale: float) -> tuple[dict[str, Change], list]:
    """Each layer's change, by our layer name, and (file name, why) for those that fit nowhere."""
    found = (unet_layers if part == UNET else text_layers)([layer.path for layer in layers], model)
    modules = dict(model.named_modules())
    changes, problems, where = {}, [], {}
    for layer in layers:
        name, t = found.get(layer.path), layer.tensors
        if name is None:
            problem = f"no such layer in the {part}"
        elif "down" not in t or "up" not in t:
            problem = "has no " + " / ".join(r for r in ("down", "up") if r not in t) + " factor"
        elif name in where:
            problem = f"changes the same layer ({name}) as {where[name]}"
        else:
            change = Change(t["down"], t["up"], t.get("mid"), scale * layer_scale(layer))
            problem = change.misfit(tuple(modules[name].weight.shape), f"{part} layer {name}")
        if problem:
            problems.append((layer.name, problem))
        else:
            where[name], changes[name] = layer.name, change
    return changes, problems


def _squeezed(shape) -> tuple[int, ...]:
    """(out, in) and (out, in, 1, 1) are the same weight to a LoRA: a linear and a 1x1 convolution."""
    shape = tuple(shape)
    return shape[:2] if all(s == 1 for s in shape[2:]) else shape
