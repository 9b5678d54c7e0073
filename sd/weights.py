"""Reading checkpoints: the official single-file layout, the diffusers folder layout, and
working out the model family and configs from what is stored.

Our modules are named after the single-file keys, so a single file needs no renaming.
A diffusers folder's UNet and VAE go through the small rule tables below.
"""

import json
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .clip import CLIP_BIG_G, CLIP_L, CLIPConfig
from .schedule import ScheduleConfig
from .tensorfile import CheckpointError, StateDict, read_metadata, read_safetensors  # noqa: F401 (re-exported)
from .tiny import apply_preset
from .unet import SD15, SDXL, UNet, UNetConfig
from .vae import VAE_SD15, VAE_SDXL, VAEConfig


# Tensors real files carry that no model needs: skipped, never an error.
SKIPPED = re.compile(r"(^|\.)position_ids$|^logit_scale$|^betas$|^alphas_cumprod|^posterior_|^model_ema\."
                     r"|num_batches_tracked$|^sqrt_|^log_one_minus")


def split_prefix(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not SKIPPED.search(k[len(prefix):])}


def text_model(sd: StateDict) -> StateDict:
    """A CLIP text encoder's tensors in our names: HF's `text_model.` prefix dropped (old files
    and transformers 5 state dicts lack it), junk such as `position_ids` skipped."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not SKIPPED.search(k)}


def hf_text_model(sd: StateDict) -> StateDict:
    """The inverse of `text_model`: our CLIP tensors -> transformers' names, under `text_model.`
    but for the projection (CLIPTextModelWithProjection keeps `text_projection` at the top)."""
    return {(k if k.startswith("text_projection.") else "text_model." + k): v for k, v in sd.items()}


# The layers our models are made of; each draws random weights in its constructor.
INITIALISED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)
_no_init_lock = threading.Lock()


@contextmanager
def no_weight_init():
    """Layers built inside skip `reset_parameters`, their random initialisation. The checkpoint
    replaces every weight anyway, and on the meta device the initialisers only cost time: about
    half of building SD 1.5's modules. (accelerate's init_empty_weights and transformers'
    no_init_weights do the same.) It patches the layer classes for the duration, so another
    thread building such layers meanwhile would get uninitialised ones; sd builds models only here."""
    with _no_init_lock:
        own = {cls: cls.__dict__.get("reset_parameters") for cls in INITIALISED_LAYERS}
        for cls in INITIALISED_LAYERS:
            cls.reset_parameters = _skip
        try:
            yield
        finally:
            for cls, method in own.items():
                if method is None:
                    del cls.reset_parameters  # Conv2d's is inherited from _ConvNd
                else:
                    cls.reset_parameters = method


def _skip(self):
    pass


def build(module_cls, cfg, sd: StateDict, what: str, source) -> torch.nn.Module:
    """Instantiate `module_cls(cfg)` without allocating or initialising weights, then adopt the
    tensors of `sd` as its parameters. Missing or unexpected keys are a CheckpointError."""
    with torch.device("meta"), no_weight_init():
        model = module_cls(cfg)
    expected = dict(model.named_parameters())  # our models keep no buffers
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)}, model {tuple(v.shape)}"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        def listing(label, keys):
            if not keys:
                return ""
            return f"\n  {label} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
        raise CheckpointError(f"{source}: the {what} weights do not fit the model"
                              + listing("missing keys", missing) + listing("unexpected keys", unexpected)
                              + listing("wrong shapes", wrong))
    # Adopt each tensor as it is (no copy): five times faster than load_state_dict(assign=True).
    modules = dict(model.named_modules())
    for key, tensor in sd.items():
        owner, _, name = key.rpartition(".")
        modules[owner].register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    return model.eval()


# ---------------------------------------------------------------- configs from weights

def _count(sd: StateDict, pattern: str) -> int:
    """How many distinct values the (\\d+) group of `pattern` takes among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _dim(sd: StateDict, key: str, axis: int, default):
    """A tensor's size along `axis`, or `default` when the file lacks it (build() then names it)."""
    tensor = sd.get(key)
    return tensor.shape[axis] if tensor is not None and tensor.ndim > axis else default


def unet_config_from_weights(sd: StateDict, family: str) -> UNetConfig:
    """Channel counts, depths and widths read off the tensors; head counts from the family
    (SD 1.5: 8 heads per level; SDXL: 64 channels per head), which weights cannot tell. A size
    whose tensor is missing comes from another tensor or the family's preset, so that build()
    can list exactly what is missing instead of failing on the first absent key."""
    preset = SDXL if family == "sdxl" else SD15
    mc = _dim(sd, "input_blocks.0.0.weight", 0, _dim(sd, "time_embed.0.weight", 1, preset.model_channels))
    levels = _count(sd, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    num_res_blocks = max(1, (len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")}) - levels) // levels)
    mult, depth = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        width = _dim(sd, f"input_blocks.{first}.0.out_layers.3.weight", 0,
                     _dim(sd, f"input_blocks.{first}.0.in_layers.2.weight", 0, mc))
        mult.append(max(1, width // mc))
        depth.append(_count(sd, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    heads = tuple(8 for _ in mult) if family != "sdxl" else tuple(max(1, mc * m // 64) for m in mult)
    return replace(preset, in_channels=_dim(sd, "input_blocks.0.0.weight", 1, preset.in_channels),
                   out_channels=_dim(sd, "out.2.weight", 0, preset.out_channels), model_channels=mc,
                   channel_mult=tuple(mult), num_res_blocks=num_res_blocks, transformer_depth=tuple(depth),
                   mid_transformer_depth=_count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
                   heads=heads, context_dim=to_k.shape[1] if to_k is not None else preset.context_dim,
                   linear_proj=proj_in.ndim == 2 if proj_in is not None else preset.linear_proj,
                   adm_in_channels=_dim(sd, "label_emb.0.0.weight", 1, None),
                   time_cond_proj_dim=_dim(sd, "time_cond_proj.weight", 1, None))


def vae_config_from_weights(sd: StateDict, family: str) -> VAEConfig:
    preset = VAE_SDXL if family == "sdxl" else VAE_SD15
    ch = _dim(sd, "encoder.conv_in.weight", 0, _dim(sd, "decoder.conv_out.weight", 1, preset.channels))
    levels = _count(sd, r"encoder\.down\.(\d+)\.") or len(preset.channel_mult)
    return replace(preset, channels=ch, image_channels=_dim(sd, "encoder.conv_in.weight", 1, preset.image_channels),
                   channel_mult=tuple(max(1, _dim(sd, f"encoder.down.{i}.block.0.conv1.weight", 0, ch) // ch)
                                      for i in range(levels)),
                   num_res_blocks=_count(sd, r"encoder\.down\.0\.block\.(\d+)\.") or preset.num_res_blocks,
                   latent_channels=_dim(sd, "post_quant_conv.weight", 0, preset.latent_channels))


def clip_config_from_weights(sd: StateDict, preset: CLIPConfig = CLIP_L) -> CLIPConfig:
    """CLIP text encoders use 64 channels per head (CLIP-L: 768/12, bigG: 1280/20)."""
    width = _dim(sd, "embeddings.token_embedding.weight", 1, _dim(sd, "final_layer_norm.weight", 0, preset.width))
    return replace(preset, vocab_size=_dim(sd, "embeddings.token_embedding.weight", 0, preset.vocab_size),
                   width=width, heads=max(1, width // 64),
                   max_positions=_dim(sd, "embeddings.position_embedding.weight", 0, preset.max_positions),
                   layers=_count(sd, r"encoder\.layers\.(\d+)\."),
                   mlp_width=_dim(sd, "encoder.layers.0.mlp.fc1.weight", 0, preset.mlp_width),
                   projection_dim=_dim(sd, "text_projection.weight", 0, None))


# ---------------------------------------------------------------- diffusers names -> single-file names

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "time_embedding.cond_proj": "time_cond_proj",
            "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_from_diffusers(sd: StateDict, config: UNetConfig | None = None) -> StateDict:
    """diffusers `down_blocks.1.attentions.0.proj_in` -> LDM `input_blocks.4.1.proj_in`, and so on.
    The block layout is read off the keys, or from `config` where the keys are too few to tell (a LoRA's)."""
    if config is None:
        n = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")  # resnets per down block
        up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    else:  # diffusers' up block b is level (levels - 1 - b)
        n, depths = config.num_res_blocks, config.transformer_depth
        up_has_attn = {b for b, depth in enumerate(reversed(depths)) if depth}

    def rename(key: str) -> str:
        for old, new in UNET_TOP.items():
            if key.startswith(old + "."):
                return new + key[len(old):]
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            side, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down":
                stem = f"input_blocks.{1 + b * (n + 1) + j}"
            else:
                stem = f"output_blocks.{b * (n + 1) + j}"
            return f"{stem}.1.{rest}" if kind == "attentions" else f"{stem}.0.{_resnet(rest)}"
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            b = int(m[1])
            return f"output_blocks.{b * (n + 1) + n}.{2 if b in up_has_attn else 1}.{m[2]}"
        if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            return f"middle_block.1.{m[1]}"
        if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        return key  # unknown: reported as unexpected by build()

    return {rename(k): v for k, v in sd.items()}


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{RESNET.get(layer, layer)}.{param}"


def unet_to_diffusers(sd: StateDict, config: UNetConfig) -> StateDict:
    """The inverse of `unet_from_diffusers`: LDM `input_blocks.4.1.proj_in` -> diffusers
    `down_blocks.1.attentions.0.proj_in`, and so on, for a UNet of `config`."""
    n = config.num_res_blocks
    up_has_attn = {b for b, depth in enumerate(reversed(config.transformer_depth)) if depth}
    top = {new: old for old, new in UNET_TOP.items()}

    def rename(key: str) -> str:
        for new, old in top.items():
            if key.startswith(new + "."):
                return old + key[len(new):]
        if m := re.match(r"input_blocks\.(\d+)\.0\.op\.(.*)", key):
            return f"down_blocks.{int(m[1]) // (n + 1) - 1}.downsamplers.0.conv.{m[2]}"
        if m := re.match(r"input_blocks\.(\d+)\.([01])\.(.*)", key):
            b, j = divmod(int(m[1]) - 1, n + 1)
            if m[2] == "1":
                return f"down_blocks.{b}.attentions.{j}.{m[3]}"
            return f"down_blocks.{b}.resnets.{j}.{_ldm_resnet(m[3])}"
        if m := re.match(r"output_blocks\.(\d+)\.([012])\.(.*)", key):
            b, j = divmod(int(m[1]), n + 1)
            if m[2] == "0":
                return f"up_blocks.{b}.resnets.{j}.{_ldm_resnet(m[3])}"
            if m[2] == "1" and b in up_has_attn:
                return f"up_blocks.{b}.attentions.{j}.{m[3]}"
            return f"up_blocks.{b}.upsamplers.0.{m[3]}"
        if m := re.match(r"middle_block\.1\.(.*)", key):
            return f"mid_block.attentions.0.{m[1]}"
        if m := re.match(r"middle_block\.([02])\.(.*)", key):
            return f"mid_block.resnets.{int(m[1]) // 2}.{_ldm_resnet(m[2])}"
        raise KeyError(f"{key}: not a UNet tensor name")

    return {rename(k): v for k, v in sd.items()}


def _ldm_resnet(rest: str) -> str:
    for old, new in RESNET.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_ATTN_OLD = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # old diffusers VAEs' names


def vae_from_diffusers(sd: StateDict) -> StateDict:
    """diffusers `decoder.up_blocks.0.resnets.1` -> LDM `decoder.up.3.block.1` (up blocks run in
    reverse), mid-block attention linears -> 1x1 convolutions."""
    levels = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, v in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k):
            k = f"{m[1]}.mid.attn_1.{VAE_ATTN.get(m[2], VAE_ATTN_OLD.get(m[2], m[2]))}.{m[3]}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}", k)
        out[k] = v
    return out


def vae_to_diffusers(sd: StateDict) -> StateDict:
    """The inverse of `vae_from_diffusers`: LDM `decoder.up.3.block.1` -> diffusers
    `decoder.up_blocks.0.resnets.1`, the mid-block attention's 1x1 convolutions -> linears."""
    levels = _count(sd, r"decoder\.up\.(\d+)\.")
    attn = {new: old for old, new in VAE_ATTN.items()}
    out = {}
    for key, v in sd.items():
        k = key.replace("norm_out", "conv_norm_out").replace("nin_shortcut", "conv_shortcut")
        k = re.sub(r"mid\.block_(\d)", lambda m: f"mid_block.resnets.{int(m[1]) - 1}", k)
        if m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(.+)\.(weight|bias)$", k):
            k = f"{m[1]}.mid_block.attentions.0.{attn[m[2]]}.{m[3]}"
            if v.ndim == 4:
                v = v[:, :, 0, 0]
        k = re.sub(r"encoder\.down\.(\d+)\.block", r"encoder.down_blocks.\1.resnets", k)
        k = re.sub(r"encoder\.down\.(\d+)\.downsample", r"encoder.down_blocks.\1.downsamplers.0", k)
        k = re.sub(r"decoder\.up\.(\d+)\.(block|upsample)", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}."
                   + ("resnets" if m[2] == "block" else "upsamplers.0"), k)
        out[k] = v
    return out


def openclip_to_hf(sd: StateDict) -> StateDict:
    """OpenCLIP text tower (SDXL's `conditioner.embedders.1.model.*`) -> our Hugging Face names:
    the fused q/k/v projection split in three, `text_projection` (used as x @ P) transposed."""
    names = {"token_embedding": "embeddings.token_embedding", "ln_final": "final_layer_norm",
             "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    out = {}
    for key, v in sd.items():
        if key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif key == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            for name, part in zip("qkv", v.chunk(3)):
                out[f"encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        else:
            k = re.sub(r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1.", key)
            for old, new in names.items():
                k = re.sub(rf"(^|\.){re.escape(old)}\.", rf"\g<1>{new}.", k)
            out[k] = v
    return out


def hf_to_openclip(sd_: StateDict) -> StateDict:
    """The inverse of `openclip_to_hf`, for writing SDXL single files (sd/writer.py): our
    (Hugging Face named) bigG text tower -> OpenCLIP names as SDXL's single file stores them:
    q/k/v fused into `attn.in_proj_*`, `positional_embedding` without `.weight`, and `text_projection`
    as the matrix P used as x @ P, i.e. the transpose of the Linear weight."""
    out = {}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, v in sd_.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = v
        elif key == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            if m[2] == "q":
                parts = [sd_[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(parts).contiguous()
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            out[f"transformer.resblocks.{m[1]}.{layer_names[m[2]]}.{m[3]}"] = v
        else:
            raise KeyError(f"{key}: not a CLIP text tower tensor name")
    return out


# Where an official single file keeps each part. CLIP-L in Hugging Face names under `text_model.`;
# SDXL's bigG in OpenCLIP names (openclip_to_hf / hf_to_openclip).
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_L_PREFIX = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
BIG_G_PREFIX = "conditioner.embedders.1.model."


def unet_prefix(keys: list[str]) -> str:
    """Where a file keeps its UNet: under `model.diffusion_model.` in a full single file,
    at the top level in a UNet-only file."""
    return UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in keys) else ""


def read_unet_file(path, device="cpu", dtype=None) -> StateDict:
    """The UNet of a UNet-only file (either naming) or of a full single file, in our names;
    nothing else in the file is read."""
    return unet_state_dict(read_safetensors(path, device, dtype, only=unet_prefix), path)


def unet_state_dict(sd: StateDict, path) -> StateDict:
    """A UNet-only file in either naming (SDXL-Lightning ships diffusers names) -> ours."""
    if UNET_PREFIX + "input_blocks.0.0.weight" in sd:
        sd = split_prefix(sd, UNET_PREFIX)
    sd = unet_from_diffusers(sd) if "conv_in.weight" in sd else sd
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"unet: {path} is not a UNet file (no conv_in.weight or input_blocks.0.0.weight; "
                              f"keys like {', '.join(list(sd)[:3])})")
    return sd


# ---------------------------------------------------------------- the two layouts

@dataclass
class Checkpoint:
    """What a source holds, in our (single-file) names, before any model is built."""
    family: str                                   # "sd15", "sd15_inpaint" or "sdxl"
    unet: tuple[UNetConfig, StateDict]
    vae: tuple[VAEConfig, StateDict]
    text_encoders: list[tuple[CLIPConfig, StateDict]]  # CLIP-L, then (SDXL) OpenCLIP bigG
    tokenizer_dirs: list[Path | None] = field(default_factory=list)  # None: the vocabulary shipped with sd
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scheduler_class: str | None = None            # diffusers class named by the folder, if any
    scheduler: dict = field(default_factory=dict)  # the folder's scheduler_config.json
    sample_size: int | None = None                # default image side in pixels
    vae_force_upcast: bool = False                # the VAE overflows in float16 (SDXL's does)
    defaults: dict = field(default_factory=dict)  # sampler / num_steps / guidance a preset names (sd/tiny.py)
    preset: str | None = None                     # that preset's name, which sd.save writes back
    source: str = ""                              # the file or folder, for messages


def fits(cfg: UNetConfig, sd: StateDict) -> bool:
    """Whether `sd` has exactly the tensors, with the shapes, a UNet of `cfg` has."""
    with torch.device("meta"), no_weight_init():
        model = UNet(cfg)
    return {k: tuple(v.shape) for k, v in model.named_parameters()} == {k: tuple(v.shape) for k, v in sd.items()}


def replacement_config(base: UNetConfig, sd: StateDict, family: str, source) -> UNetConfig:
    """A UNet that replaces a model's (unet=, Lightning) takes the model's config, head counts
    included, whenever its tensors fit it: weights cannot tell head counts. Otherwise the config is
    read off its weights, heads by the family's rule (SD 1.5: 8 per level, SDXL: 64 channels per
    head), and a warning says so."""
    if fits(base, sd):
        return base
    warnings.warn(f"{source}: the replacement UNet's tensors do not fit the model's UNet config; its config is "
                  "read from the weights, with the family's head counts", stacklevel=3)
    return unet_config_from_weights(sd, family)


def detect_family(unet_sd: StateDict) -> str:
    if "label_emb.0.0.weight" in unet_sd:
        return "sdxl"
    conv_in = unet_sd.get("input_blocks.0.0.weight")
    return "sd15_inpaint" if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == 9 else "sd15"


def _check_replacement(unet: StateDict, base_is_sdxl: bool, source):
    family = detect_family(unet)
    if (family == "sdxl") != base_is_sdxl:
        raise CheckpointError(f"unet: a {family} UNet does not fit the {'SDXL' if base_is_sdxl else 'SD 1.5'} "
                              f"model in {source}")


def read_single_file(path: Path, device="cpu", dtype=None, unet: StateDict | None = None) -> Checkpoint:
    """`unet`: a replacement UNet (our names); the file's own UNet is then not read at all."""
    skip = UNET_PREFIX if unet is not None else None
    checkpoint = single_file_checkpoint(read_safetensors(path, device, dtype, skip), path, unet)
    return apply_preset(checkpoint, read_metadata(path), path)


def single_file_checkpoint(sd: StateDict, path, unet: StateDict | None = None) -> Checkpoint:
    """Split an official single-file state dict into its components, by key prefix."""
    if unet is not None:
        _check_replacement(unet, any(k.startswith("conditioner.") for k in sd), path)
    else:
        unet = split_prefix(sd, UNET_PREFIX)
    if not unet:
        raise CheckpointError(f"{path}: no `{UNET_PREFIX}*` tensors: not a Stable Diffusion single-file "
                              "checkpoint (a UNet-only file goes to `unet=`)")
    family = detect_family(unet)
    if family == "sdxl":
        clip_l = CLIP_L_PREFIX["sdxl"]
        parts = {f"CLIP-L text encoder ({clip_l}*)": text_model(split_prefix(sd, clip_l)),
                 f"OpenCLIP bigG text encoder ({BIG_G_PREFIX}*)": openclip_to_hf(split_prefix(sd, BIG_G_PREFIX))}
    else:
        clip_l = CLIP_L_PREFIX["sd15"]
        parts = {f"text encoder ({clip_l}*)": text_model(split_prefix(sd, clip_l))}
    parts[f"VAE ({VAE_PREFIX}*)"] = split_prefix(sd, VAE_PREFIX)
    for what, part in parts.items():
        if not part:
            raise CheckpointError(f"{path}: no {what} tensors in this file")
    *texts, vae = parts.values()
    presets = (CLIP_L, CLIP_BIG_G)
    return Checkpoint(family, (unet_config_from_weights(unet, family), unet),
                      (vae_config_from_weights(vae, family), vae),
                      [(clip_config_from_weights(t, preset), t) for t, preset in zip(texts, presets)],
                      tokenizer_dirs=[None] * len(texts), sample_size=1024 if family == "sdxl" else 512,
                      vae_force_upcast=family == "sdxl", source=str(path))


def read_component(folder: Path, names: tuple[str, ...], device, dtype) -> StateDict:
    """`folder/name` for the first of `names` present (fp32 first, then `.fp16` variants);
    a sharded `*.index.json` is followed to its shards."""
    for name in names:
        for candidate in (name, name.replace(".safetensors", ".fp16.safetensors")):
            path = folder / candidate
            if path.is_file():
                return read_safetensors(path, device, dtype)
            index = folder / (candidate + ".index.json")
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return {k: v for shard in shards for k, v in read_safetensors(folder / shard, device, dtype).items()}
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(names)} and .fp16 variants, "
                          "in safetensors format)")


def unet_config_from_diffusers(c: dict) -> UNetConfig:
    levels = len(c["block_out_channels"])
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * levels  # noqa: E731
    heads = per_level(c.get("num_attention_heads") or c.get("attention_head_dim", 8))
    layers = per_level(c.get("transformer_layers_per_block", 1))
    mc = c["block_out_channels"][0]
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(ch // mc for ch in c["block_out_channels"]), num_res_blocks=c.get("layers_per_block", 2),
        transformer_depth=tuple(n if "CrossAttn" in t else 0 for n, t in zip(layers, c["down_block_types"])),
        mid_transformer_depth=layers[-1], heads=heads, context_dim=c.get("cross_attention_dim", 768),
        linear_proj=c.get("use_linear_projection", False), norm_groups=c.get("norm_num_groups", 32),
        adm_in_channels=c.get("projection_class_embeddings_input_dim") if c.get("addition_embed_type") else None,
        time_cond_proj_dim=c.get("time_cond_proj_dim"))


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int, pooled_width: int | None = None) -> dict:
    """The inverse of `unet_config_from_diffusers`: UNet2DConditionModel's config.json for a UNet
    making `sample_size`-wide latents (SDXL: `pooled_width`, the pooled text vector's, splits
    `adm_in_channels` into it and six size/crop embeddings). `attention_head_dim` is diffusers'
    legacy name for the head counts; its middle block takes the last level's transformer depth."""
    attention = ["CrossAttn" if depth else "" for depth in cfg.transformer_depth]
    layers = [depth or 1 for depth in cfg.transformer_depth]  # 1: a level without attention ignores it
    if cfg.transformer_depth[-1] and cfg.transformer_depth[-1] != cfg.mid_transformer_depth:
        raise CheckpointError(f"unet: diffusers' config cannot hold a middle block of depth "
                              f"{cfg.mid_transformer_depth} under a last level of depth {cfg.transformer_depth[-1]}")
    layers[-1] = cfg.mid_transformer_depth
    config = {"_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": cfg.in_channels,
              "out_channels": cfg.out_channels, "layers_per_block": cfg.num_res_blocks,
              "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
              "down_block_types": [f"{a}DownBlock2D" for a in attention],
              "up_block_types": [f"{a}UpBlock2D" for a in reversed(attention)],
              "transformer_layers_per_block": layers, "attention_head_dim": list(cfg.heads),
              "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.linear_proj,
              "norm_num_groups": cfg.norm_groups, "time_cond_proj_dim": cfg.time_cond_proj_dim}
    if cfg.adm_in_channels:
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=cfg.adm_in_channels,
                      addition_time_embed_dim=(cfg.adm_in_channels - pooled_width) // 6)
    return config


def vae_config_from_diffusers(c: dict) -> VAEConfig:
    ch = c["block_out_channels"][0]
    return VAEConfig(channels=ch, channel_mult=tuple(b // ch for b in c["block_out_channels"]),
                     num_res_blocks=c.get("layers_per_block", 2), latent_channels=c.get("latent_channels", 4),
                     image_channels=c.get("in_channels", 3), norm_groups=c.get("norm_num_groups", 32),
                     scaling_factor=c.get("scaling_factor", 0.18215))


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int, force_upcast: bool) -> dict:
    """The inverse of `vae_config_from_diffusers`: AutoencoderKL's config.json."""
    levels = len(cfg.channel_mult)
    return {"_class_name": "AutoencoderKL", "sample_size": sample_size, "in_channels": cfg.image_channels,
            "out_channels": cfg.image_channels, "block_out_channels": [cfg.channels * m for m in cfg.channel_mult],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": cfg.num_res_blocks, "latent_channels": cfg.latent_channels,
            "norm_num_groups": cfg.norm_groups, "scaling_factor": cfg.scaling_factor, "force_upcast": force_upcast}


def clip_config_from_diffusers(c: dict) -> CLIPConfig:
    return CLIPConfig(vocab_size=c.get("vocab_size", 49408), max_positions=c.get("max_position_embeddings", 77),
                      width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                      mlp_width=c["intermediate_size"], act=c.get("hidden_act", "quick_gelu"),
                      eps=c.get("layer_norm_eps", 1e-5), projection_dim=c.get("projection_dim") if
                      "WithProjection" in str(c.get("architectures", "")) else None)


def clip_config_to_diffusers(cfg: CLIPConfig) -> dict:
    """The inverse of `clip_config_from_diffusers`: transformers' CLIPTextConfig, as config.json."""
    return {"architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_positions,
            "hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.mlp_width, "hidden_act": cfg.act, "layer_norm_eps": cfg.eps,
            "projection_dim": cfg.projection_dim or cfg.width, "eos_token_id": cfg.eos_id}  # pooled there


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (every component of a diffusers folder has one)") from None


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "model.safetensors"  # transformers' name
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP-L, then (SDXL) bigG


def read_diffusers_folder(folder: Path, device="cpu", dtype=None, unet: StateDict | None = None) -> Checkpoint:
    """`unet`: a replacement UNet (our names); the folder's own UNet is then not read at all."""
    unet_cfg = _json(folder / "unet" / "config.json")
    vae_cfg = _json(folder / "vae" / "config.json")
    sdxl = bool(unet_cfg.get("addition_embed_type"))
    # diffusers upcasts a VAE that says so (SDXL's) when the pipeline runs in float16; read it so.
    force_upcast = vae_cfg.get("force_upcast", True) and sdxl
    vae_dtype = torch.float32 if force_upcast and dtype == torch.float16 else dtype
    if unet is None:
        unet = unet_from_diffusers(read_component(folder / "unet", (DIFFUSERS_WEIGHTS,), device, dtype))
        unet_config = unet_config_from_diffusers(unet_cfg)
    else:
        _check_replacement(unet, sdxl, folder)
        unet_config = replacement_config(unet_config_from_diffusers(unet_cfg), unet, detect_family(unet), folder)
    vae = vae_from_diffusers(read_component(folder / "vae", (DIFFUSERS_WEIGHTS,), device, vae_dtype))
    encoders, tokenizers = [], []
    for name in TEXT_ENCODERS if sdxl else TEXT_ENCODERS[:1]:
        text = text_model(read_component(folder / name, (TEXT_ENCODER_WEIGHTS,), device, dtype))
        encoders.append((clip_config_from_diffusers(_json(folder / name / "config.json")), text))
        tokenizer_dir = folder / name.replace("text_encoder", "tokenizer")
        tokenizers.append(tokenizer_dir if (tokenizer_dir / "vocab.json").is_file() else None)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _json(sched_path) if sched_path.is_file() else {}
    return Checkpoint(
        detect_family(unet), (unet_config, unet), (vae_config_from_diffusers(vae_cfg), vae),
        encoders, tokenizer_dirs=tokenizers,
        schedule=ScheduleConfig.from_diffusers(sched), scheduler_class=sched.get("_class_name"), scheduler=sched,
        sample_size=(unet_cfg.get("sample_size") or 64) * 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        vae_force_upcast=force_upcast, source=str(folder))
