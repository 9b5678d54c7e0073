"""Checkpoints out: `sd.save` and `sd convert` (issue 15).

- Key sets: what the writer writes for the full-size SD 1.5, SD 1.5 inpainting and SDXL models (built on
  the meta device, nothing allocated) is exactly the official single-file key list, and the diffusers
  names exactly the diffusers layout's, shapes included (tests/data/checkpoint-keys).
- Round trips on tiny random-weight models, fp32 on the CPU, SD 1.5 and SDXL:
  - a diffusers folder -> `sd convert` -> one file: `sd.load` of the file gives the folder's image bit
    for bit (the same weights, read back as written);
  - a single file -> `sd convert --to-folder` -> diffusers' `from_pretrained(folder)` gives sd's image
    of the single file within helpers.PIXEL_TOL (0.51 of a level: rounding only), and `sd.load(folder)`
    gives it bit for bit;
  - `--lora FILE:SCALE` baked in gives bit for bit the image (and the weights) of loading the LoRA at
    run time: both merge in float32 from the same weights, and float32 is written as it is held; with
    `--dtype float16` the baked weights equal those of `sd.load(..., dtype=float16, loras=...)`, every bit;
  - `--dtype float16` writes float16 tensors; the shipped tiny model written again in float16 is its
    own file: the same tensors, bit for bit, and its preset's metadata.
- Broken variants of the writer (a wrong head count in the UNet's config.json, an untransposed bigG
  projection) fail the comparisons above.
- Bad flags are one line naming the flag, before anything is loaded.
Run with `pytest -s` to see the measured differences ("[parity]" lines).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import sd
from helpers import (GUIDANCE, PIXEL_TOL, PROMPT, SD15_SCHEDULE, SEED, XL_GUIDANCE, XL_PROMPT, XL_SEED,
                     assert_same_image, save_folder, tiny_sd15_components)
from sd import writer
from sd.cli import main
from sd.clip import CLIP_BIG_G, CLIP_L, CLIPTextModel
from sd.writer import single_file_tensors, write_safetensors
from sd.tiny import CHECKPOINT, PRESET_KEY
from sd.unet import SD15, SD15_INPAINT, SDXL, UNet
from sd.vae import VAE_SD15, VAE_SDXL, AutoencoderKL
from sd.weights import hf_text_model, no_weight_init, unet_to_diffusers, vae_to_diffusers

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
W, H, STEPS = 64, 48, 3
SETTINGS = {"sd15": dict(prompt=PROMPT, guidance=GUIDANCE, seed=SEED),
            "sdxl": dict(prompt=XL_PROMPT, guidance=XL_GUIDANCE, seed=XL_SEED)}


def listed(*names: str) -> dict[str, tuple]:
    """key -> (shape, dtype) of the official key lists."""
    out = {}
    for name in names:
        for line in (KEYS / name).read_text().splitlines():
            key, shape, dtype = line.split("\t")
            out[key] = (tuple(json.loads(shape)), dtype)
    return out


def described(tensors: dict) -> dict[str, tuple]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}


def picture(pipe, family: str, **kw):
    settings = SETTINGS[family]
    return pipe.generate(settings["prompt"], width=W, height=H, num_steps=STEPS, guidance=settings["guidance"],
                         seed=settings["seed"], **kw)


def image(pipe, family: str, **kw) -> np.ndarray:
    return np.asarray(picture(pipe, family, **kw))


def convert(*args) -> None:
    assert main(["convert", *map(str, args)]) == 0


def assert_same_weights(ours, theirs) -> None:
    for a, b in zip([ours.unet, ours.vae, *ours.text_encoders], [theirs.unet, theirs.vae, *theirs.text_encoders]):
        b = b.state_dict()
        assert all(v.dtype == b[k].dtype and torch.equal(v, b[k]) for k, v in a.state_dict().items())


def in_fresh_memory(pipe):
    """`pipe` with every weight copied into newly allocated memory. The same weights can round
    differently where they lie: a memory-mapped tensor sits wherever its file puts it, and BLAS picks
    its kernels by alignment (SDXL's pooled projection, memory-mapped from a folder or transposed into
    new memory from a single file, differs by 2e-7). Both sides of a bit-for-bit image check get
    this, so that it compares the weights, not their addresses."""
    for model in (pipe.unet, pipe.vae, *pipe.text_encoders):
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=False))
    return pipe


# ---------------------------------------------------------------- key sets, full size

MODELS = {  # family: (UNet, VAE, text encoders), official single-file lists, diffusers lists
    "sd15": ((SD15, VAE_SD15, (CLIP_L,)), ("ldm_sd15_unet.txt", "ldm_vae.txt", "ldm_clip_l_sd15.txt"),
             ("diffusers_sd15_unet.txt", "diffusers_vae.txt", "diffusers_clip_l.txt")),
    "sd15_inpaint": ((SD15_INPAINT, VAE_SD15, (CLIP_L,)),
                     ("ldm_sd15_inpaint_unet.txt", "ldm_vae.txt", "ldm_clip_l_sd15.txt"),
                     ("diffusers_sd15_inpaint_unet.txt", "diffusers_vae.txt", "diffusers_clip_l.txt")),
    "sdxl": ((SDXL, VAE_SDXL, (CLIP_L, CLIP_BIG_G)),
             ("ldm_sdxl_unet.txt", "ldm_vae.txt", "ldm_clip_l_sdxl.txt", "ldm_openclip_bigG.txt"),
             ("diffusers_sdxl_unet.txt", "diffusers_sdxl_vae.txt", "diffusers_clip_l.txt", "diffusers_clip_bigG.txt")),
}


def full_size(family: str):
    (unet, vae, texts), _, _ = MODELS[family]
    with torch.device("meta"), no_weight_init():
        return UNet(unet), AutoencoderKL(vae), [CLIPTextModel(cfg) for cfg in texts]


@pytest.mark.parametrize("family", list(MODELS))
def test_a_single_file_has_exactly_the_official_keys(family):
    unet, vae, texts = full_size(family)
    tensors = single_file_tensors(unet, vae, texts)
    assert all(t.device.type == "meta" for t in tensors.values())  # nothing allocated
    assert described(tensors) == listed(*MODELS[family][1])


@pytest.mark.parametrize("family", list(MODELS))
def test_a_folder_has_exactly_the_diffusers_keys(family):
    """The names write_folder gives each component's weights file, against the diffusers layout's lists."""
    unet, vae, texts = full_size(family)
    unet_list, vae_list, *text_lists = MODELS[family][2]
    assert described(unet_to_diffusers(unet.state_dict(), unet.cfg)) == listed(unet_list)
    assert described(vae_to_diffusers(vae.state_dict())) == listed(vae_list)
    for text, text_list in zip(texts, text_lists):
        assert described(hf_text_model(text.state_dict())) == listed(text_list)


# ---------------------------------------------------------------- round trips

@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return save_folder(tiny_sd15_components(), DDIMScheduler(**SD15_SCHEDULE), tmp_path_factory.mktemp("sd15"))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_folder_to_single_file_gives_the_same_image(request, family, tmp_path):
    folder = request.getfixturevalue(f"{family}_folder")
    out = tmp_path / "model.safetensors"
    convert(folder, out)
    from_file, from_folder = sd.load(out, device="cpu"), sd.load(folder, device="cpu")
    written = load_file(str(out))
    assert set(written) == set(single_file_tensors(from_folder.unet, from_folder.vae, from_folder.text_encoders))
    assert {v.dtype for v in written.values()} == {torch.float32}
    assert_same_weights(from_file, from_folder)
    a = image(in_fresh_memory(from_file), family, sampler="euler")
    b = image(in_fresh_memory(from_folder), family, sampler="euler")
    print(f"[parity] {family} folder -> single file: max |diff| {np.abs(a.astype(int) - b).max()}")
    assert np.array_equal(a, b)


def diffusers_image(folder, family: str) -> np.ndarray:
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    ref = cls.from_pretrained(folder, **({"add_watermarker": False} if family == "sdxl" else {}))
    ref.set_progress_bar_config(disable=True)
    settings = SETTINGS[family]
    return ref(settings["prompt"], width=W, height=H, num_inference_steps=STEPS,
               guidance_scale=settings["guidance"], generator=torch.Generator("cpu").manual_seed(settings["seed"]),
               output_type="np").images[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_to_folder_reads_in_diffusers(request, family, tmp_path):
    """The folder's default scheduler is the single file's (Euler on SD's schedule), so neither side is
    told a sampler."""
    single_file = request.getfixturevalue(f"{family}_single_file")
    folder = tmp_path / "folder"
    convert(single_file, folder, "--to-folder")
    ours, from_folder = sd.load(single_file, device="cpu"), sd.load(folder, device="cpu")
    assert_same_weights(from_folder, ours)
    expected = picture(in_fresh_memory(ours), family)
    assert np.array_equal(image(in_fresh_memory(from_folder), family), np.asarray(expected))
    assert_same_image(expected, diffusers_image(folder, family), f"{family} single file -> folder -> diffusers")


def test_a_wrong_head_count_in_the_folder_fails(sd15_single_file, tmp_path, monkeypatch):
    """The check above can fail: the same weights, a config with twice the heads."""
    right = writer.unet_config_to_diffusers

    def twice_the_heads(cfg, *args):
        config = right(cfg, *args)
        return {**config, "attention_head_dim": [2 * h for h in config["attention_head_dim"]]}
    monkeypatch.setattr(writer, "unet_config_to_diffusers", twice_the_heads)
    folder = tmp_path / "folder"
    convert(sd15_single_file, folder, "--to-folder")
    expected = picture(sd.load(sd15_single_file, device="cpu"), "sd15")
    with pytest.raises(AssertionError, match="max pixel difference"):
        assert_same_image(expected, diffusers_image(folder, "sd15"), "broken heads")


def test_an_untransposed_projection_fails(sdxl_single_file, tmp_path, monkeypatch):
    """...and so can the bit-for-bit round trip: bigG's projection written as the Linear weight it is
    held as, not as OpenCLIP's x @ P matrix."""
    right = writer.hf_to_openclip

    def untransposed(state):
        return {k: (v.T.contiguous() if k == "text_projection" else v) for k, v in right(state).items()}
    monkeypatch.setattr(writer, "hf_to_openclip", untransposed)
    out = tmp_path / "model.safetensors"
    writer.save(sd.load(sdxl_single_file, device="cpu"), out)
    a, b = image(sd.load(out, device="cpu"), "sdxl"), image(sd.load(sdxl_single_file, device="cpu"), "sdxl")
    assert np.abs(a.astype(int) - b).max() > PIXEL_TOL


# ---------------------------------------------------------------- LoRAs baked in, dtypes

def kohya_lora(pipe, path: Path, seed: int) -> Path:
    """A kohya-ss LoRA (rank 4, alpha 2) on every linear layer of the UNet's transformer blocks and of
    each text encoder's layers, in single-file names (lora_te_ for SD 1.5, lora_te1_ / lora_te2_ for SDXL)."""
    g = torch.Generator().manual_seed(seed)
    texts = ["lora_te_"] if len(pipe.text_encoders) == 1 else ["lora_te1_", "lora_te2_"]
    parts = [("lora_unet_", pipe.unet, ".transformer_blocks."), *((p, t, "encoder.layers.")
                                                                   for p, t in zip(texts, pipe.text_encoders))]
    tensors = {}
    for prefix, model, inside in parts:
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear) and inside in f".{name}":
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.3
                tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.3
                tensors[f"{key}.alpha"] = torch.tensor(2.0)
    return write_safetensors(path, tensors)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_baked_lora_is_the_lora_loaded_at_run_time(request, family, tmp_path):
    single_file = request.getfixturevalue(f"{family}_single_file")
    plain = sd.load(single_file, device="cpu")
    lora = kohya_lora(plain, tmp_path / "style.safetensors", seed=5)
    out = tmp_path / "baked.safetensors"
    convert(single_file, out, "--lora", f"{lora}:0.8")
    baked, at_run_time = sd.load(out, device="cpu"), sd.load(single_file, device="cpu", loras=[(lora, 0.8)])
    assert_same_weights(baked, at_run_time)
    a, b = image(in_fresh_memory(baked), family), image(in_fresh_memory(at_run_time), family)
    print(f"[parity] {family} baked LoRA vs run time: max |diff| {np.abs(a.astype(int) - b).max()}")
    assert np.array_equal(a, b)
    before = plain.unet.state_dict()
    changed = [k for k, v in baked.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 10, "the LoRA changed next to nothing"


def test_a_float16_bake_holds_the_weights_of_a_float16_run(sdxl_single_file, tmp_path):
    plain = sd.load(sdxl_single_file, device="cpu")
    lora = kohya_lora(plain, tmp_path / "style.safetensors", seed=6)
    out = tmp_path / "baked16.safetensors"
    convert(sdxl_single_file, out, "--lora", str(lora), "--dtype", "float16")
    baked = sd.load(out, device="cpu", dtype=torch.float16)
    at_run_time = sd.load(sdxl_single_file, device="cpu", dtype=torch.float16, loras=[lora])
    # What a LoRA changes, held in float16 both ways (SDXL's VAE is read into float32 either way).
    for ours, theirs in zip([baked.unet, *baked.text_encoders], [at_run_time.unet, *at_run_time.text_encoders]):
        theirs = theirs.state_dict()
        assert all(v.dtype == torch.float16 and torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("to_folder", [False, True], ids=["single-file", "folder"])
def test_dtype_float16_writes_float16(tmp_path, to_folder):
    out = tmp_path / ("folder" if to_folder else "tiny16.safetensors")
    convert(CHECKPOINT, out, "--dtype", "float16", *(["--to-folder"] if to_folder else []))
    files = list(out.rglob("*.safetensors")) if to_folder else [out]
    assert len(files) == (3 if to_folder else 1)  # the folder: UNet, VAE, text encoder
    for path in files:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path


def test_the_tiny_model_written_again_is_its_own_file(tmp_path):
    """scripts/train_tiny.py writes the shipped model with this writer: float16, its preset named in the
    metadata. Loaded and written again it is the same file's tensors, every bit, and the same metadata."""
    out = sd.save(sd.load(CHECKPOINT, device="cpu", dtype=torch.float16), tmp_path / "again.safetensors")
    shipped, again = load_file(str(CHECKPOINT)), load_file(str(out))
    assert shipped.keys() == again.keys()
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in shipped.items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {PRESET_KEY: "tiny-shapes"}
    assert sd.load(out, device="cpu").defaults == sd.load(CHECKPOINT, device="cpu").defaults


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("args, message", [
    (["tiny", "{tmp}/out.ckpt"], "OUT: a single-file checkpoint is a .safetensors file"),
    (["tiny", "{tmp}"], "OUT: a single-file checkpoint is a .safetensors file"),
    (["tiny", "{tmp}/full", "--to-folder"], "OUT: {tmp}/full exists and is not an empty folder"),
    (["{checkpoint}", "{checkpoint}"], "OUT: {checkpoint} is the SOURCE itself"),
    (["{tmp}/missing.safetensors", "{tmp}/o.safetensors"], "SOURCE: {tmp}/missing.safetensors: no such file"),
    (["{tmp}/full", "{tmp}/o.safetensors"], "SOURCE: {tmp}/full: a folder must be in the diffusers layout"),
    (["tiny", "{tmp}/o.safetensors", "--dtype", "float8"], "--dtype: 'float8' is not one of float32, float16"),
    (["tiny", "{tmp}/o.safetensors", "--lora", "{tmp}/no.safetensors:0.5"], "--lora: {tmp}/no.safetensors: no such"),
])
def test_a_bad_flag_is_one_line_before_loading(tmp_path, capsys, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    paths = {"tmp": tmp_path, "checkpoint": CHECKPOINT}
    assert main(["convert", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: " + message.format(**paths)), err
    assert "loading" not in err


@pytest.mark.parametrize("kwargs, message", [
    ({"path": "x.bin"}, "path: a single-file checkpoint is a .safetensors file"),
    ({"path": "x.safetensors", "dtype": "int8"}, "dtype: 'int8' is not one of"),
    ({"path": "x", "layout": "ckpt"}, "layout: 'ckpt' is not one of single-file, diffusers"),
])
def test_save_checks_its_arguments(kwargs, message):
    with pytest.raises(sd.InputError, match=message):
        sd.save(None, **kwargs)
