"""LoRA files merged into the weights (sd/lora.py), image for image against diffusers'
`load_lora_weights` + `fuse_lora(lora_scale=s)` on the same files.

Random-weight LoRA files, in each layout real ones come in, for the tiny SD 1.5 and SDXL models:
- kohya-ss, the layers sd-scripts' networks/lora.py picks: Linear / Conv2d inside the UNet's
  transformers (with LoCon also inside its resnets, down- and upsamplers) and inside CLIP's attention
  and MLP; alpha 3 on rank 4. SD 1.5 files name UNet layers by diffusers' paths
  (`lora_unet_down_blocks_1_attentions_0_...`), SDXL files by the single file's
  (`lora_unet_input_blocks_4_1_...`, taken from sd's UNet, whose names are those keys) with
  `lora_te1_` / `lora_te2_`; text encoders by Hugging Face names (`lora_te_text_model_encoder_...`).
- diffusers / PEFT: adapters put in by peft itself and written by diffusers' `save_lora_weights` with
  its lora_adapter_metadata: alpha 2 on rank 4, `rank_pattern` (to_v: rank 2), `alpha_pattern`
  (to_k: alpha 8), rsLoRA in the text encoders.
Cases: each layout on the UNet alone and with the text encoders, LoCon convolutions, scales 0.5 and
1, and two LoRAs stacked (diffusers: two adapters, set_adapters with both weights, fuse_lora).

Tolerance as tests/test_pipeline.py: ours is a uint8 image, the reference diffusers' float image
times 255, so an exact match differs by at most 0.5: max |ours - ref * 255| <= 0.51. Every case
also checks that the LoRA changes the picture, and test_parity_catches_wrong_coefficients shows
that a wrong alpha, a dropped rsLoRA rule or text encoder parts left out fail the comparison.
Run with `pytest -s` to see the measured differences ("[parity]" lines).

transformers 5.24 asks for peft >= 0.22.0 in `load_adapter`, which diffusers uses for the text
encoders' LoRA; the newest peft on PyPI is 0.21.2, whose functions that code calls all exist. The
version check is lifted for this module's tests only (fixture `peft_version_check_lifted`).
"""

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers import CLIPTextModel as HFCLIPTextModel

import sd
from helpers import (SD15_SCHEDULE, SDXL_SCHEDULER, TEXT_WIDTH, assert_close_scaled, assert_same_image,
                     hf_text_config, randomize_params, tiny_sd15_components, tiny_sdxl_unet, tokenizers)
from sd import clip as sd_clip
from sd import lora
from sd import unet as sd_unet
from sd.weights import no_weight_init

PROMPT = "a red circle on a blue square"
STEPS, GUIDANCE, SEED, WIDTH, HEIGHT = 3, 5.0, 3, 64, 48
RANK, ALPHA = 4, 3.0  # kohya files: scale alpha / rank = 0.75
# kohya-ss' networks/lora.py: the module classes whose Linear / Conv2d layers a LoRA changes.
KOHYA_UNET = {"Transformer2DModel", "SpatialTransformer"}     # diffusers' class, sd's (SDXL files)
KOHYA_LOCON = {"ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample"}
KOHYA_TEXT = {"CLIPAttention", "CLIPMLP"}


@pytest.fixture(autouse=True)
def peft_version_check_lifted(monkeypatch):
    import transformers.integrations.peft as transformers_peft
    monkeypatch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)


# ---------------------------------------------------------------- the two tiny models

@dataclass
class Family:
    name: str
    folder: Path
    pipeline_class: type
    unet: nn.Module                # the UNet kohya's trainer names layers after: diffusers' (SD 1.5), sd's (SDXL)
    text_encoders: list[nn.Module]  # transformers' models, whose names the files use
    ours: sd.Pipeline
    files: Path
    diffusers_unet: nn.Module = None  # the UNet a PEFT adapter is put into
    base: object = None            # our picture without a LoRA
    references: dict = field(default_factory=dict)
    reference_base: object = None  # diffusers' pipeline on the folder, without LoRAs

    def generate(self):
        return self.ours.generate(PROMPT, width=WIDTH, height=HEIGHT, num_steps=STEPS, guidance=GUIDANCE, seed=SEED)

    def reference(self, loras: tuple[tuple[str, float], ...]) -> np.ndarray:
        """diffusers' picture with these LoRAs fused, computed once per case."""
        if loras not in self.references:
            if self.reference_base is None:
                self.reference_base = self.pipeline_class.from_pretrained(self.folder, **self.options)
                self.reference_base.set_progress_bar_config(disable=True)
            ref = copy.deepcopy(self.reference_base)  # a fresh one: fusing changes the weights
            if len(loras) == 1:
                ref.load_lora_weights(self.files / loras[0][0])
                ref.fuse_lora(lora_scale=loras[0][1])
            else:
                names = [f"lora{i}" for i in range(len(loras))]
                for name, (case, _) in zip(names, loras):
                    ref.load_lora_weights(self.files / case, adapter_name=name)
                ref.set_adapters(names, adapter_weights=[scale for _, scale in loras])
                ref.fuse_lora(adapter_names=names)
            out = ref(PROMPT, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      generator=torch.Generator("cpu").manual_seed(SEED), output_type="np")
            self.references[loras] = out.images[0]
        return self.references[loras]

    @property
    def options(self) -> dict:
        return dict(add_watermarker=False) if self.name == "sdxl" else \
            dict(safety_checker=None, requires_safety_checker=False)


def factors(layer: nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) as kohya's LoRAModule shapes them: a convolution's down has its kernel, its up is
    1x1. Scaled so the change is about half the weight's size, which a picture shows plainly."""
    if isinstance(layer, nn.Linear):
        down = torch.randn(rank, layer.in_features, generator=g) / math.sqrt(layer.in_features)
        up = torch.randn(layer.out_features, rank, generator=g)
    else:
        fan_in = layer.weight[0].numel()
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g) / math.sqrt(fan_in)
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=g)
    return down, up * 0.5 / math.sqrt(rank)


def kohya_tensors(family: Family, unet: nn.Module, *, text: bool, conv: bool, seed: int = 0) -> dict:
    """kohya's names for `unet`'s layers: diffusers' paths for diffusers' UNet, single-file ones for sd's."""
    g = torch.Generator().manual_seed(seed)
    te_prefixes = ["lora_te_"] if family.name == "sd15" else ["lora_te1_", "lora_te2_"]
    parts = [("lora_unet_", unet, KOHYA_UNET | (KOHYA_LOCON if conv else set()))]
    if text:
        parts += [(p, m, KOHYA_TEXT) for p, m in zip(te_prefixes, family.text_encoders)]
    out = {}
    for prefix, model, classes in parts:
        for name, module in model.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child, layer in module.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    path = f"{name}.{child}"
                    if prefix.startswith("lora_te"):  # kohya's transformers 4 names: text_model.encoder...
                        path = "text_model." + path.removeprefix("text_model.")
                    key = prefix + path.replace(".", "_")
                    out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = factors(layer, RANK, g)
                    out[key + ".alpha"] = torch.tensor(ALPHA)
    return out


def write_peft(family: Family, path: Path, *, text: bool, seed: int = 1) -> None:
    """Adapters injected by peft into copies of diffusers' / transformers' models, random, written
    by diffusers' save_lora_weights with their configs as lora_adapter_metadata."""
    g = torch.Generator().manual_seed(seed)
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                   "ff.net.2", "conv1"],
                             rank_pattern={"to_v": 2}, alpha_pattern={"to_k": 8})
    text_config = LoraConfig(r=4, lora_alpha=3, target_modules=["q_proj", "v_proj", "fc1"], use_rslora=True)
    parts = [("unet", family.diffusers_unet, unet_config)]
    if text:
        parts += [(name, m, text_config) for name, m in zip(("text_encoder", "text_encoder_2"), family.text_encoders)]
    kwargs = {}
    for name, model, config in parts:
        model = inject_adapter_in_model(config, copy.deepcopy(model))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
                elif "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5 / math.sqrt(p.shape[1]))
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    family.pipeline_class.save_lora_weights(path.parent, weight_name=path.name, **kwargs)


CASES = {  # file name -> how it is made
    # SDXL: as diffusers' conversion scripts name an SDXL UNet, then as kohya's trainer does.
    "kohya-unet.safetensors": lambda f, p: save_file(kohya_tensors(f, f.diffusers_unet, text=False, conv=False), p),
    "kohya-locon.safetensors": lambda f, p: save_file(kohya_tensors(f, f.unet, text=True, conv=True), p),
    "peft-unet.safetensors": lambda f, p: write_peft(f, p, text=False),
    "peft-text.safetensors": lambda f, p: write_peft(f, p, text=True),
}


def finish(family: Family) -> Family:
    for name, write in CASES.items():
        write(family, family.files / name)
    family.base = family.generate()
    return family


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Family:
    components = tiny_sd15_components(TEXT_WIDTH)
    folder = tmp_path_factory.mktemp("lora-sd15")
    StableDiffusionPipeline(**components, scheduler=DDIMScheduler(**SD15_SCHEDULE), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return finish(Family("sd15", folder, StableDiffusionPipeline, components["unet"], [components["text_encoder"]],
                         sd.load(folder, device="cpu"), tmp_path_factory.mktemp("lora-sd15-files"), components["unet"]))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Family:
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, scaling_factor=0.13025, force_upcast=True)
    text_encoder = HFCLIPTextModel(hf_text_config("quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(hf_text_config("gelu", projection_dim=TEXT_WIDTH))
    for seed, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        randomize_params(model, seed=seed)
    tok, tok2 = tokenizers()
    euler = {k: v for k, v in SDXL_SCHEDULER.items() if k in EulerDiscreteScheduler.__init__.__code__.co_varnames}
    folder = tmp_path_factory.mktemp("lora-sdxl")
    StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              tokenizer=tok, tokenizer_2=tok2, scheduler=EulerDiscreteScheduler(**euler),
                              add_watermarker=False).save_pretrained(folder)
    ours = sd.load(folder, device="cpu")
    return finish(Family("sdxl", folder, StableDiffusionXLPipeline, ours.unet, [text_encoder, text_encoder_2], ours,
                         tmp_path_factory.mktemp("lora-sdxl-files"), unet))


# ---------------------------------------------------------------- parity

def ours_with(family: Family, loras) -> np.ndarray:
    for case, scale in loras:
        family.ours.load_lora(family.files / case, scale)
    try:
        return family.generate()
    finally:
        family.ours.unload_loras()


PARITY = {
    "kohya-unet@1": (("kohya-unet.safetensors", 1.0),),
    "kohya-locon+text@0.5": (("kohya-locon.safetensors", 0.5),),
    "peft-unet@0.5": (("peft-unet.safetensors", 0.5),),
    "peft-text@1": (("peft-text.safetensors", 1.0),),
    "stacked:kohya-locon+text@0.5,peft-text@1": (("kohya-locon.safetensors", 0.5), ("peft-text.safetensors", 1.0)),
}
# Each SDXL case costs 2-3 s on a 2-core CPU; the suite runs the three that cover what SDXL adds
# (either UNet naming in kohya files, lora_te1_ / lora_te2_, PEFT's text_encoder_2), SD_SLOW_TESTS=1 all.
SDXL_IN_SUITE = {"kohya-unet@1", "kohya-locon+text@0.5", "peft-text@1"}
SLOW = pytest.mark.skipif(not os.environ.get("SD_SLOW_TESTS"), reason="SD_SLOW_TESTS=1 runs every SDXL case")


@pytest.mark.parametrize("family_name, case", [("sd15", case) for case in PARITY] + [
    pytest.param("sdxl", case, marks=() if case in SDXL_IN_SUITE else SLOW) for case in PARITY])
def test_matches_diffusers(request, family_name, case):
    family = request.getfixturevalue(family_name)
    loras = PARITY[case]
    img = ours_with(family, loras)
    changed = np.abs(np.asarray(img, dtype=float) - np.asarray(family.base, dtype=float)).max()
    assert changed > 20, f"{case}: the LoRA hardly changes the picture ({changed} levels), the comparison proves little"
    assert_same_image(img, family.reference(loras), f"lora/{family_name}/{case}")


def no_alpha_pattern(layer) -> float:
    """PEFT's scale from lora_alpha alone, its alpha_pattern overlooked."""
    config = layer.peft_config
    return lora.alpha_scale(config.get("lora_alpha"), layer.tensors["down"].shape[0], bool(config.get("use_rslora")))


def dropping(pattern: str):
    """lora.read, leaving out the tensors whose keys match: a loader that skips what it cannot place."""
    read = lora.read

    def read_some(source):
        state, metadata, label = read(source)
        return {k: v for k, v in state.items() if not re.search(pattern, k)}, metadata, label
    return read_some


BROKEN = {  # what is wrong -> (where, the wrong version, a case it must break)
    "alpha ignored": ("alpha_scale", lambda alpha, rank, rslora=False: 1.0, "kohya-unet@1"),
    "rsLoRA read as plain alpha / rank": ("alpha_scale", lambda alpha, rank, rslora=False: (alpha or rank) / rank,
                                          "peft-text@1"),
    "PEFT alpha_pattern ignored": ("layer_scale", no_alpha_pattern, "peft-unet@0.5"),
    "text encoder parts left out": ("read", dropping(r"^lora_te"), "kohya-locon+text@0.5"),
    "LoCon convolutions left out": ("read", dropping(r"resnets|samplers"), "kohya-locon+text@0.5"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_parity_catches_wrong_coefficients(sd15, monkeypatch, broken):
    """The parity tests can fail: each deliberately wrong merge gives a different picture."""
    name, wrong, case = BROKEN[broken]
    with monkeypatch.context() as patched:
        patched.setattr(lora, name, wrong)
        img = ours_with(sd15, PARITY[case])
    with pytest.raises(AssertionError, match="max pixel difference"):
        assert_same_image(img, sd15.reference(PARITY[case]), f"broken: {broken}")


# ---------------------------------------------------------------- names at full size

FULL_SIZE = {  # diffusers' UNet configs of the published models (the parts that shape the layer tree)
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


@pytest.mark.parametrize("family", list(FULL_SIZE))
def test_every_full_size_unet_layer_is_found_by_either_name(family):
    """Every linear and convolution of SD 1.5's and SDXL's UNets (on the meta device), named as
    diffusers does (dotted: PEFT; underscored: kohya SD 1.5), is found at the layer diffusers' own
    single-file converter (convert_ldm_unet_checkpoint) maps to it; single-file names find themselves.
    The attention layers alone, as most LoRAs have them, are too few to tell the block layout: with it
    read off the keys instead of the model's config, this test fails (checked by hand)."""
    with torch.device("meta"):
        reference = UNet2DConditionModel(**FULL_SIZE[family])
        with no_weight_init():
            ours = sd_unet.UNet(sd_unet.SDXL if family == "sdxl" else sd_unet.SD15)
    state = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    diffusers_name = {id(v): k for k, v in convert_ldm_unet_checkpoint(state, dict(reference.config)).items()}
    expected = {diffusers_name[id(v)].removesuffix(".weight"): k.removeprefix("model.diffusion_model.")
                .removesuffix(".weight") for k, v in state.items() if k.endswith(".weight")}
    layers = [n for n, m in reference.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) > 250
    attention = [n for n in layers if ".attentions." in n]  # what most LoRAs change: too few keys to tell the layout
    for subset in (layers, attention):
        for names in (subset, [n.replace(".", "_") for n in subset]):
            found = lora.unet_layers(names, ours)
            assert [found.get(n) for n in names] == [expected[n] for n in subset]
    ldm = [n for n, m in ours.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert lora.unet_layers([n.replace(".", "_") for n in ldm], ours) == {n.replace(".", "_"): n for n in ldm}


def test_full_size_text_encoder_layers_are_found():
    """kohya's `lora_te*_text_model_encoder_...` names for CLIP-L and bigG, as transformers names them."""
    for preset in (sd_clip.CLIP_L, sd_clip.CLIP_BIG_G):
        config = CLIPTextConfig(hidden_size=preset.width, intermediate_size=preset.mlp_width,
                                num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                                projection_dim=preset.projection_dim or 512)
        with torch.device("meta"):
            reference = (CLIPTextModelWithProjection if preset.projection_dim else HFCLIPTextModel)(config)
            with no_weight_init():
                ours = sd_clip.CLIPTextModel(preset)
        layers = {n.removeprefix("text_model."): m for n, m in reference.named_modules() if isinstance(m, nn.Linear)}
        found = lora.text_layers(["text_model_" + n.replace(".", "_") for n in layers], ours)
        assert len(found) == len(layers) >= 6 * preset.layers
        assert all(ours.get_submodule(found["text_model_" + n.replace(".", "_")]).weight.shape == m.weight.shape
                   for n, m in layers.items())


def test_older_diffusers_names_read_as_peft(sd15):
    """`.lora.down.weight` / `.lora_linear_layer.up.weight` (diffusers before PEFT) mean lora_A / lora_B."""
    tensors = load_file(str(sd15.files / "peft-text.safetensors"))
    renamed = {k.replace(".lora_A.", ".lora.down." if k.startswith("unet.") else ".lora_linear_layer.down.")
               .replace(".lora_B.", ".lora.up." if k.startswith("unet.") else ".lora_linear_layer.up."): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    merged = []
    for state in (tensors, renamed):
        sd15.ours.load_lora(state)
        merged.append({k: p.detach().clone() for k, p in parameters(sd15.ours).items()})
        sd15.ours.unload_loras()
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


# ---------------------------------------------------------------- what merging keeps and restores

def parameters(pipe) -> dict:
    return {(i, k): p for i, m in enumerate([pipe.unet, *pipe.text_encoders]) for k, p in m.named_parameters()}


def test_unload_restores_the_very_tensors(sd15):
    pipe = sd15.ours
    before = parameters(pipe)
    copies = {k: p.detach().clone() for k, p in before.items()}
    pipe.load_lora(sd15.files / "kohya-locon.safetensors", 0.5)
    pipe.load_lora(sd15.files / "peft-text.safetensors", 1.0)
    during = parameters(pipe)
    changed = [k for k in before if during[k] is not before[k]]
    assert len(changed) > 50 and any(i == 1 for i, _ in changed), "the UNet and the text encoder both change"
    # Merging never writes into a weight (it may be mapped from its file): new tensors replace them.
    assert all(torch.equal(before[k], copies[k]) for k in before)
    assert all(not torch.equal(during[k], copies[k]) for k in changed)
    pipe.unload_loras()
    after = parameters(pipe)
    assert all(after[k] is before[k] and torch.equal(after[k], copies[k]) for k in before)


def test_stacking_recomputes_from_the_original(sd15):
    """A then B gives the weights B then A does, each the original plus both changes (cast once)."""
    pipe = sd15.ours
    a, b = sd15.files / "kohya-locon.safetensors", sd15.files / "peft-text.safetensors"
    pipe.load_lora(a, 0.5).load_lora(b, 1.0)
    ab = {k: p.detach().clone() for k, p in parameters(pipe).items()}
    pipe.unload_loras().load_lora(b, 1.0).load_lora(a, 0.5)
    ba = parameters(pipe)
    pipe.unload_loras()
    assert all(torch.allclose(ab[k], ba[k], rtol=0, atol=1e-6) for k in ab)


def test_low_precision_weights_cast_once(sd15):
    """In bfloat16 each changed weight is (original in float32 + change in float32) rounded once."""
    pipe = sd.load(sd15.folder, device="cpu", dtype=torch.bfloat16)
    tensors = load_file(str(sd15.files / "kohya-unet.safetensors"))
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = pipe.unet.get_submodule("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    original = layer.weight
    pipe.load_lora(sd15.files / "kohya-unet.safetensors", 0.5)
    change = 0.5 * ALPHA / RANK * tensors[key + ".lora_up.weight"] @ tensors[key + ".lora_down.weight"]
    assert torch.equal(layer.weight, (original.float() + change).to(torch.bfloat16))
    twice = original + change.to(torch.bfloat16)  # rounding the change first, then the sum
    assert not torch.equal(layer.weight, twice), "this check tells one rounding from two"
    pipe.unload_loras()
    assert layer.weight is original


def test_tucker_mid_factor_matches_three_convolutions(sd15):
    """LyCORIS' Tucker LoCon (lora_down 1x1, lora_mid k x k, lora_up 1x1): the merged 3x3 convolution
    computes what the three convolutions in a row add (diffusers does not read `lora_mid`)."""
    pipe = sd15.ours
    conv = pipe.unet.get_submodule("input_blocks.1.0.in_layers.2")  # diffusers' down_blocks.0.resnets.0.conv1
    g = torch.Generator().manual_seed(5)
    down = torch.randn(3, conv.in_channels, 1, 1, generator=g) / math.sqrt(conv.in_channels)
    mid = torch.randn(2, 3, 3, 3, generator=g) / 3
    up = torch.randn(conv.out_channels, 2, 1, 1, generator=g)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    x = torch.randn(1, conv.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        expected = conv(x) + 0.8 * (1.5 / 3) * F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
        pipe.load_lora({key + ".lora_down.weight": down, key + ".lora_mid.weight": mid, key + ".lora_up.weight": up,
                        key + ".alpha": torch.tensor(1.5)}, 0.8)
        try:
            merged = conv(x)
        finally:
            pipe.unload_loras()
    assert_close_scaled(merged, expected, name="tucker LoCon")


def test_load_applies_loras_argument(sd15):
    path = sd15.files / "kohya-locon.safetensors"
    pipe = sd.load(sd15.folder, device="cpu", loras=[(path, 0.5), str(sd15.files / "peft-unet.safetensors")])
    sd15.ours.load_lora(path, 0.5).load_lora(sd15.files / "peft-unet.safetensors")
    try:
        expected = parameters(sd15.ours)
        assert all(torch.equal(p, expected[k]) for k, p in parameters(pipe).items())
    finally:
        sd15.ours.unload_loras()


@pytest.mark.parametrize("loras, error, message", [
    ("style.safetensors", sd.InputError, "loras: must be a list"),
    ([("style.safetensors", 1.0, 2)], sd.InputError, "loras: each entry"),
    ([("missing.safetensors", 1.0)], FileNotFoundError, "loras: missing.safetensors: no such LoRA file"),
    ([("EXISTING", "strong")], sd.InputError, "scale: a LoRA's scale must be a finite number"),
    ([("EXISTING", float("nan"))], sd.InputError, "scale"),
])
def test_bad_loras_argument_fails_before_reading(tmp_path, loras, error, message):
    existing = tmp_path / "style.safetensors"
    existing.write_bytes(b"")
    loras = [tuple(str(existing) if x == "EXISTING" else x for x in e) for e in loras] \
        if isinstance(loras, list) else loras
    with pytest.raises(error, match=message):
        sd.load(tmp_path / "no-such-model", loras=loras)  # the model is never read: the argument fails first


def test_lora_flag(tmp_path):
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"")
    assert lora.parse_lora_flag(f"{path}:0.6") == (path, 0.6)
    assert lora.parse_lora_flag(f"{path}:-1") == (path, -1.0)
    assert lora.parse_lora_flag(str(path)) == (path, 1.0)
    with pytest.raises(FileNotFoundError, match="--lora: .*no such LoRA file .*FILE\\[:SCALE\\]"):
        lora.parse_lora_flag(f"{path}:strong")
    with pytest.raises(sd.InputError, match="--lora: SCALE"):
        lora.parse_lora_flag(f"{path}:inf")


# ---------------------------------------------------------------- refusing what does not fit

def weights_unchanged(pipe, before) -> bool:
    return all(p is before[k] for k, p in parameters(pipe).items())


def test_one_unplaceable_key_fails_loudly(sd15):
    tensors = load_file(str(sd15.files / "kohya-locon.safetensors"))
    bad = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn3_to_q"
    tensors[bad + ".lora_down.weight"] = torch.zeros(RANK, 64)
    tensors[bad + ".lora_up.weight"] = torch.zeros(64, RANK)
    before = parameters(sd15.ours)
    with pytest.raises(lora.LoraError) as info:
        sd15.ours.load_lora(tensors)
    message = str(info.value)
    assert f"{bad}: no such layer in the UNet" in message and "1 of its" in message and "none is applied" in message
    assert weights_unchanged(sd15.ours, before)


@pytest.mark.parametrize("key, why", [
    ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight", "has no down factor"),
    ("lora_unet_mid_block_attentions_0_proj_out.diffusion", "not a LoRA tensor name"),
    ("lora_vae_decoder_conv_in.lora_down.weight", "not a LoRA tensor name"),
])
def test_incomplete_or_unknown_tensors_are_named(sd15, key, why):
    with pytest.raises(lora.LoraError, match=f"{key.rsplit('.lora_up', 1)[0]}.*: {why}"):
        sd15.ours.load_lora({key: torch.zeros(64, RANK)})


def test_wrong_shape_is_named(sd15):
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    tensors = {key + ".lora_down.weight": torch.zeros(RANK, 32), key + ".lora_up.weight": torch.zeros(37, RANK)}
    with pytest.raises(lora.LoraError, match=r"makes a change of shape \(37, 32\) for text encoder layer "
                                             r"encoder.layers.0.mlp.fc1 of shape \(37, 64\)"):
        sd15.ours.load_lora(tensors)


def test_one_layer_named_twice_is_refused(sd15):
    """Diffusers' and single-file names of one layer in one file: merging both would count it twice."""
    pair = {"lora_down.weight": torch.zeros(RANK, 64), "lora_up.weight": torch.zeros(64, RANK)}
    names = ("down_blocks_1_attentions_0_proj_in", "input_blocks_4_1_proj_in")
    tensors = {f"lora_unet_{name}.{role}": t for name in names for role, t in pair.items()}
    with pytest.raises(lora.LoraError, match=r"changes the same layer \(input_blocks.4.1.proj_in\) as"):
        sd15.ours.load_lora(tensors)
    tensors = {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(RANK, 64),
               "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(64, RANK + 1)}
    with pytest.raises(lora.LoraError, match=r"factors that do not chain \(up \(64, 5\), down \(4, 64\)\)"):
        sd15.ours.load_lora(tensors)


def test_sdxl_lora_on_sd15_says_sdxl(sd15, sdxl):
    before = parameters(sd15.ours)
    with pytest.raises(lora.LoraError) as info:
        sd15.ours.load_lora(sdxl.files / "kohya-locon.safetensors")
    message = str(info.value)
    print(message)
    assert "could not be placed in this SD 1.5 model" in message
    assert "\n  lora_te2_text_model_encoder_layers_0_mlp_fc1 and 17 more: 18 layers of a second text encoder, and " \
           "this model has one text encoder\n" in message
    assert "It looks made for another model: it changes a second text encoder, as SDXL LoRAs do" in message
    assert "its cross-attention reads 128-wide text, this model's 64-wide" in message
    assert weights_unchanged(sd15.ours, before)


@pytest.mark.parametrize("suffix, kind", [
    ("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"),
    ("oft_blocks", "OFT"), ("diff", "full weight differences"),
])
def test_other_network_kinds_are_refused_by_name(sd15, suffix, kind):
    tensors = load_file(str(sd15.files / "kohya-unet.safetensors"))
    tensors[f"lora_unet_down_blocks_1_attentions_0_proj_in.{suffix}"] = torch.zeros(4)
    with pytest.raises(lora.LoraError, match=f"{kind}.* is not supported, only LoRA and LoCon"):
        sd15.ours.load_lora(tensors)


def test_missing_file_and_bad_scale(sd15, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        sd15.ours.load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(sd.InputError, match="scale: a LoRA's scale must be a finite number, got '1'"):
        sd15.ours.load_lora(sd15.files / "kohya-unet.safetensors", "1")
