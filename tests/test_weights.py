"""Loading: the official key sets at full size (meta device), family detection, the diffusers
name table, and the errors a user sees for files that are broken or don't fit."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sd
from sd.clip import CLIP_BIG_G, CLIP_L, CLIPTextModel
from sd.unet import SD15, SD15_INPAINT, SDXL, UNet
from sd.vae import VAE_SD15, VAE_SDXL, AutoencoderKL
from sd.weights import (CheckpointError, build, read_safetensors, single_file_checkpoint, unet_from_diffusers,
                        unet_state_dict, vae_from_diffusers)

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
# The junk real single files carry next to the model tensors; the loader must skip all of it.
JUNK = {"cond_stage_model.transformer.text_model.embeddings.position_ids": [1, 77], "alphas_cumprod": [1000],
        "betas": [1000], "logit_scale": [], "model_ema.decay": [], "model_ema.num_updates": [],
        "model_ema.diffusion_modelinput_blocks00weight": [320, 4, 3, 3], "posterior_variance": [1000]}


def meta_tensors(*files: str, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Shape-only tensors for every `key<TAB>shape<TAB>dtype` line of the listed key files."""
    out = {}
    for name in files:
        for line in (KEYS / name).read_text().splitlines():
            key, shape, _ = line.split("\t")
            out[key] = torch.empty(eval(shape), device="meta")
    for key, shape in (extra or {}).items():
        out[key] = torch.empty(shape, device="meta")
    return out


@pytest.mark.parametrize("unet_keys,family,preset", [
    ("ldm_sd15_unet.txt", "sd15", SD15),
    ("ldm_sd15_inpaint_unet.txt", "sd15_inpaint", SD15_INPAINT),
])
def test_single_file_full_size_consumes_exactly_the_official_keys(unet_keys, family, preset):
    state = meta_tensors(unet_keys, "ldm_vae.txt", "ldm_clip_l_sd15.txt", extra=JUNK)
    ckpt = single_file_checkpoint(state, "meta")
    assert ckpt.family == family
    (unet_cfg, unet_sd), (vae_cfg, vae_sd), [(clip_cfg, clip_sd)] = ckpt.unet, ckpt.vae, ckpt.text_encoders
    assert (unet_cfg, vae_cfg, clip_cfg) == (preset, VAE_SD15, CLIP_L)  # configs read off the shapes = presets
    # build() is strict: every model parameter must come from the file and every tensor must be used.
    models = [build(UNet, unet_cfg, unet_sd, "UNet", "meta"), build(AutoencoderKL, vae_cfg, vae_sd, "VAE", "meta"),
              build(CLIPTextModel, clip_cfg, clip_sd, "text encoder", "meta")]
    consumed = {p + k for p, m in zip(("model.diffusion_model.", "first_stage_model.",
                                       "cond_stage_model.transformer.text_model."), models) for k in m.state_dict()}
    assert consumed == set(state) - set(JUNK)
    assert all(p.device.type == "meta" for m in models for p in m.parameters())  # nothing allocated


def test_sdxl_single_file_full_size_consumes_exactly_the_official_keys():
    state = meta_tensors("ldm_sdxl_unet.txt", "ldm_vae.txt", "ldm_clip_l_sdxl.txt", "ldm_openclip_bigG.txt",
                         extra={k: v for k, v in JUNK.items() if not k.startswith("cond_stage")}
                         | {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": [1, 77],
                            "conditioner.embedders.1.model.logit_scale": []})
    ckpt = single_file_checkpoint(state, "meta")
    assert ckpt.family == "sdxl" and ckpt.vae_force_upcast and ckpt.sample_size == 1024
    (unet_cfg, unet_sd), (vae_cfg, vae_sd) = ckpt.unet, ckpt.vae
    [(l_cfg, l_sd), (g_cfg, g_sd)] = ckpt.text_encoders
    assert (unet_cfg, vae_cfg, l_cfg, g_cfg) == (SDXL, VAE_SDXL, CLIP_L, CLIP_BIG_G)
    unet = build(UNet, unet_cfg, unet_sd, "UNet", "meta")
    vae = build(AutoencoderKL, vae_cfg, vae_sd, "VAE", "meta")
    clip_l = build(CLIPTextModel, l_cfg, l_sd, "CLIP-L", "meta")
    big_g = build(CLIPTextModel, g_cfg, g_sd, "bigG", "meta")
    assert set(unet.state_dict()) == {k.removeprefix("model.diffusion_model.") for k in state
                                      if k.startswith("model.diffusion_model.")}
    assert len(vae.state_dict()) == len(meta_tensors("ldm_vae.txt"))
    assert len(clip_l.state_dict()) == len(meta_tensors("ldm_clip_l_sdxl.txt"))
    # bigG: 389 OpenCLIP tensors; each fused in_proj weight/bias becomes three q/k/v tensors.
    fused = [k for k in meta_tensors("ldm_openclip_bigG.txt") if ".in_proj_" in k]
    assert len(big_g.state_dict()) == len(meta_tensors("ldm_openclip_bigG.txt")) + 2 * len(fused)
    # and the converted names are exactly the diffusers layout's text_encoder_2 names, shapes included
    listed = {k.removeprefix("text_model."): tuple(v.shape) for k, v in meta_tensors("diffusers_clip_bigG.txt").items()
              if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in g_sd.items()} == listed


def test_lightning_unet_file_in_diffusers_names_is_read_as_ours():
    """SDXL-Lightning's `sdxl_lightning_*_unet.safetensors` use the diffusers SDXL UNet names."""
    renamed = unet_state_dict(meta_tensors("diffusers_sdxl_unet.txt"), "lightning")
    build(UNet, SDXL, renamed, "UNet", "meta")
    prefixed = unet_state_dict(meta_tensors("ldm_sdxl_unet.txt"), "x")  # the single-file naming also works
    assert set(prefixed) == set(renamed)
    with pytest.raises(CheckpointError, match="unet: vae.safetensors is not a UNet file"):
        unet_state_dict(meta_tensors("diffusers_vae.txt"), "vae.safetensors")


def test_lightning_steps_must_be_positive(tmp_path):
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="lightning_steps: must be a whole number of at least 1"):
            sd.load(tmp_path / "anything.safetensors", device="cpu", lightning_steps=bad)


@pytest.mark.parametrize("diffusers_keys,ldm_keys,preset", [
    ("diffusers_sd15_unet.txt", "ldm_sd15_unet.txt", SD15),
    ("diffusers_sd15_inpaint_unet.txt", "ldm_sd15_inpaint_unet.txt", SD15_INPAINT),
    ("diffusers_sdxl_unet.txt", "ldm_sdxl_unet.txt", SDXL),
])
def test_diffusers_unet_names_map_onto_the_official_keys(diffusers_keys, ldm_keys, preset):
    renamed = unet_from_diffusers(meta_tensors(diffusers_keys))
    official = {k.removeprefix("model.diffusion_model."): v for k, v in meta_tensors(ldm_keys).items()}
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in official.items()}
    build(UNet, preset, renamed, "UNet", "meta")


@pytest.mark.parametrize("diffusers_keys", ["diffusers_vae.txt", "diffusers_sdxl_vae.txt"])
def test_diffusers_vae_names_map_onto_the_official_keys(diffusers_keys):
    renamed = vae_from_diffusers(meta_tensors(diffusers_keys))
    official = {k.removeprefix("first_stage_model."): v for k, v in meta_tensors("ldm_vae.txt").items()}
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in official.items()}
    build(AutoencoderKL, VAE_SD15, renamed, "VAE", "meta")
    build(AutoencoderKL, VAE_SDXL, renamed, "VAE", "meta")


def test_old_diffusers_vae_attention_names():
    """Old diffusers VAEs call the mid attention query/key/value/proj_attn."""
    new = meta_tensors("diffusers_vae.txt")
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in new.items():
        for a, b in renames.items():
            key = key.replace(a, b)
        old[key] = value
    assert set(vae_from_diffusers(old)) == set(vae_from_diffusers(new))


def test_diffusers_clip_keys_are_ours_after_the_text_model_prefix():
    ours = {k: tuple(v.shape) for k, v in CLIPTextModel(CLIP_L).to("meta").state_dict().items()}
    listed = {k.removeprefix("text_model."): tuple(v.shape) for k, v in meta_tensors("diffusers_clip_l.txt").items()
              if not k.endswith("position_ids")}
    assert listed == ours


def test_missing_unexpected_and_misshapen_keys_are_named():
    state = meta_tensors("ldm_sd15_unet.txt", "ldm_vae.txt", "ldm_clip_l_sd15.txt")
    unet_sd = single_file_checkpoint(state, "x").unet[1]
    del unet_sd["out.2.bias"]
    unet_sd["input_blocks.1.1.surprise.weight"] = torch.empty(3, device="meta")
    unet_sd["time_embed.0.bias"] = torch.empty(7, device="meta")
    with pytest.raises(CheckpointError) as e:
        build(UNet, SD15, unet_sd, "UNet", "model.safetensors")
    msg = str(e.value)
    assert "model.safetensors" in msg and "UNet" in msg
    assert "missing keys (1): out.2.bias" in msg
    assert "unexpected keys (1): input_blocks.1.1.surprise.weight" in msg
    assert "time_embed.0.bias: file (7,), model (1280,)" in msg


def test_not_safetensors_and_truncated_files(tmp_path):
    junk = tmp_path / "model.ckpt"
    junk.write_bytes(b"PK\x03\x04 this is a zip pickle, not safetensors" * 10)
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*not a safetensors file"):
        read_safetensors(junk)
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.zeros(10)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        read_safetensors(cut)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        read_safetensors(tmp_path / "nowhere.safetensors")


def test_reads_straight_into_the_requested_dtype(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"f": torch.randn(4, 4, dtype=torch.float16), "i": torch.arange(3)}, str(path))
    out = read_safetensors(path, dtype=torch.float32)
    assert out["f"].dtype == torch.float32 and out["i"].dtype == torch.int64  # integers keep their type


def test_a_file_without_a_unet_or_a_folder_without_model_index(tmp_path):
    path = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.quant_conv.weight": torch.zeros(8, 8, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match="no `model.diffusion_model"):
        sd.load(path, device="cpu")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        sd.load(tmp_path / "folder", device="cpu")
    with pytest.raises(FileNotFoundError, match="huggingface.co"):
        sd.load(tmp_path / "missing.safetensors", device="cpu")


def test_loading_runs_no_initialiser_and_leaves_torch_layers_as_they_were(monkeypatch):
    """Every weight comes from the file: building the models draws nothing, and the layer
    classes get their own reset_parameters back afterwards."""
    from sd.tiny import CHECKPOINT
    from sd.weights import INITIALISED_LAYERS

    def refuse(*args, **kwargs):
        raise AssertionError("a weight initialiser ran while loading")
    before = {cls: cls.reset_parameters for cls in INITIALISED_LAYERS}
    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_"):
        monkeypatch.setattr(torch.nn.init, name, refuse)
    pipe = sd.load(CHECKPOINT, device="cpu")
    monkeypatch.undo()
    assert {cls: cls.reset_parameters for cls in INITIALISED_LAYERS} == before
    assert all(not p.is_meta and not p.requires_grad for p in pipe.unet.parameters())
    assert torch.nn.Linear(8, 8).weight.abs().sum() > 0  # layers built afterwards are initialised again


def _resident_peak_since(reset: bool = False) -> int:
    """Linux: the process's peak resident memory in bytes; `reset` restarts it from now."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-memory reset")
def test_converting_while_reading_peaks_at_the_converted_size_not_the_mapped_file_plus_it(tmp_path):
    """float32 file -> float16: each tensor is read into its own memory, converted and freed.
    Mapping the file instead would keep every page read resident: 1.5x the file at the end."""
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.randn(512, 1024) for i in range(64)}, str(path))  # 128 MiB
    size = path.stat().st_size
    before = _resident_peak_since(reset=True)
    out = read_safetensors(path, dtype=torch.float16)
    peak = _resident_peak_since() - before
    assert out["w3"].dtype == torch.float16 and len(out) == 64
    assert peak < 0.7 * size, f"peak {peak / size:.2f}x the file"  # 0.5x kept + one 2 MiB tensor at a time
    same = read_safetensors(path)  # kept as stored: memory-mapped, and equal to the converted values
    assert torch.equal(same["w3"].half(), out["w3"])
