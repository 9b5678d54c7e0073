"""The Workers AI model registry (sd/registry.py): layout, defaults, overrides, `sd.load("@cf/...")`;
and the server's memory-bounded model cache (sd/serve/cache.py) with its shared components, on tiny
random-weight files put where the registry expects the official ones."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sd
from helpers import UNET_XL, randomize_params
from sd import unet as sd_unet
from sd.registry import (REGISTRY, Registry, UnknownModel, WeightsMissing, load_model, parse_overrides,
                         spec_of)
from sd.serve.cache import ModelCache, pipeline_bytes
from sd.serve.jobs import GenerationJob

BASE = "@cf/stabilityai/stable-diffusion-xl-base-1.0"
LIGHTNING = "@cf/bytedance/stable-diffusion-xl-lightning"
SD15 = "@cf/runwayml/stable-diffusion-v1-5-img2img"
INPAINT = "@cf/runwayml/stable-diffusion-v1-5-inpainting"
LCM = "@cf/lykon/dreamshaper-8-lcm"


def place(weights, model_id, source):
    """Copy `source` to where the registry expects the model's first file."""
    spec = spec_of(model_id)
    dest = weights / spec.source
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, sdxl_single_file, tiny_checkpoint):
    """A weights dir with tiny SDXL base + Lightning UNet and tiny SD 1.5 files in the official places."""
    root = tmp_path_factory.mktemp("weights")
    place(root, BASE, sdxl_single_file)
    unet = randomize_params(sd_unet.UNet(UNET_XL), seed=11)
    lightning = root / REGISTRY[LIGHTNING].unet
    lightning.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(lightning))
    place(root, SD15, tiny_checkpoint)
    return root


def test_registry_has_the_five_models_in_their_folders():
    assert set(REGISTRY) == {BASE, LIGHTNING, SD15, INPAINT, LCM}
    for spec in REGISTRY.values():
        own = [f for f in spec.files if f.folder == spec.folder]
        assert own, f"{spec.id} stores nothing under weights/{spec.folder}/"
    # Lightning's encoders and VAE are the base file's: one copy on disk, under the base's folder.
    shared = [f for f in REGISTRY[LIGHTNING].files if f.folder != REGISTRY[LIGHTNING].folder]
    assert shared == list(REGISTRY[BASE].files)
    assert REGISTRY[INPAINT].needs == ("image", "mask") and REGISTRY[INPAINT].keep_unmasked
    assert all(f.path.endswith((".safetensors", ".json", ".txt")) for s in REGISTRY.values() for f in s.files)


def test_missing_weights_name_the_files_and_the_command(tmp_path):
    reg = Registry(tmp_path)
    assert reg.missing(SD15) == [tmp_path / "stable-diffusion-v1-5-img2img" / "v1-5-pruned-emaonly.safetensors"]
    assert "sd download " + SD15 in reg.missing_message(SD15)
    with pytest.raises(WeightsMissing, match="sd download @cf/runwayml/stable-diffusion-v1-5-img2img"):
        load_model(SD15, reg)
    with pytest.raises(WeightsMissing, match="sd download"):
        ModelCache(reg, device="cpu").get(SD15)
    present = {e["name"]: e["present"] for e in reg.describe()}
    assert present == dict.fromkeys(REGISTRY, False)


def test_overrides(tmp_path, tiny_checkpoint):  # noqa: F811
    assert parse_overrides([f"{SD15}={tiny_checkpoint}"]) == {SD15: tiny_checkpoint}
    for bad, message in [("nonsense", "--model: expected ID=SOURCE"), (f"{SD15}=", "--model: expected ID=SOURCE"),
                         ("@cf/nobody/nothing=x", "is not one of")]:
        with pytest.raises((ValueError, UnknownModel), match=message):
            parse_overrides([bad])
    reg = Registry(tmp_path, {SD15: tiny_checkpoint, LCM: tmp_path / "gone"})
    assert reg.missing(SD15) == [] and reg.missing(LCM) == [tmp_path / "gone"]
    assert "given with --model" in reg.missing_message(LCM)


def test_load_by_id_takes_the_registry_defaults(weights, monkeypatch):
    monkeypatch.setenv("SD_WEIGHTS_DIR", str(weights))
    pipe = sd.load(SD15, device="cpu")
    assert (pipe.defaults.width, pipe.defaults.num_steps, pipe.defaults.guidance) == (512, 20, 7.5)
    assert (pipe.defaults.strength, pipe.defaults.inpaint_strength) == (1.0, 1.0)
    lightning = sd.load(LIGHTNING, device="cpu")
    assert (lightning.defaults.num_steps, lightning.defaults.guidance, lightning.defaults.sampler) == (4, 0.0, "euler")
    assert lightning.schedule_config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="unet= and lightning_steps= apply to files"):
        sd.load(SD15, unet="x.safetensors")


def test_base_and_lightning_share_encoders_and_vae(weights):
    models = ModelCache(Registry(weights), device="cpu")
    lightning = models.get(LIGHTNING)
    base = models.get(BASE)
    assert base.vae is lightning.vae and base.text_encoders[0] is lightning.text_encoders[0]
    assert base.unet is not lightning.unet
    assert (base.defaults.num_steps, base.defaults.guidance) == (20, 7.5)
    assert base.schedule_config.timestep_spacing == "leading"  # Lightning's trailing spacing did not leak
    # Each equals the same model loaded on its own.
    kwargs = dict(width=64, height=48, num_steps=3, seed=1)
    alone = sd.load(weights / REGISTRY[BASE].source, device="cpu")
    assert np.array_equal(np.asarray(base.generate("a fox", **kwargs)), np.asarray(alone.generate("a fox", **kwargs)))
    alone = sd.load(weights / REGISTRY[BASE].source, unet=weights / REGISTRY[LIGHTNING].unet, lightning_steps=4,
                    device="cpu")
    assert np.array_equal(np.asarray(lightning.generate("a fox", **kwargs)),
                          np.asarray(alone.generate("a fox", **kwargs)))
    # Shared modules count once.
    assert models.used_bytes() < pipeline_bytes(base) + pipeline_bytes(lightning)


def test_cache_evicts_least_recently_used_beyond_its_budget(weights):
    models = ModelCache(Registry(weights), device="cpu", max_bytes=1)  # room for one model at a time
    first = models.get(SD15)
    models.get(BASE)
    assert list(models.pipelines) == [BASE]
    assert models.get(SD15) is not first  # reloaded
    roomy = ModelCache(Registry(weights), device="cpu")
    roomy.get(SD15), roomy.get(BASE)
    assert list(roomy.pipelines) == [SD15, BASE]


def test_a_job_gets_its_models_modes_and_defaults(weights, tiny_checkpoint):  # noqa: F811
    reg = Registry(weights, {INPAINT: tiny_checkpoint})  # a 4-channel stand-in: the server doesn't mind
    models = ModelCache(reg, device="cpu")
    for missing in ({}, {"image": b"x"}):
        with pytest.raises(ValueError, match="required by @cf/runwayml/stable-diffusion-v1-5-inpainting"):
            models.check(GenerationJob(INPAINT, {"prompt": "a fox", **missing}))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = np.zeros((48, 64), np.uint8)
    mask[8:40, 16:48] = 255
    models.check(GenerationJob(INPAINT, {"prompt": "a fox", "image": picture, "mask": mask}))
    out = models.get(INPAINT).generate("a fox", image=picture, mask=Image.fromarray(mask), num_steps=2, seed=1)
    outside = mask == 0
    assert np.array_equal(np.asarray(out)[outside], np.asarray(picture)[outside])  # keep_unmasked on by default
    assert out.info["sd"]["keep_unmasked"] is True
    out = models.get(SD15).generate("a fox", image=picture, num_steps=2, seed=1)
    assert out.size == (64, 48) and out.info["sd"]["strength"] == 1.0
    fresh = ModelCache(reg, device="cpu")
    before = {m: fresh.defaults(m) for m in (SD15, INPAINT)}  # what a job is checked against before a load
    assert before == {m: fresh.get(m).defaults for m in (SD15, INPAINT)}


def test_source_checks_pass_each_layout_and_name_what_is_wrong(tmp_path, sdxl_single_file, tiny_checkpoint):
    """What `sd serve` reads at startup (headers, not weights) passes every layout sd.load takes, a
    diffusers folder saved by diffusers included, and names the file and the fault otherwise."""
    from diffusers import DDIMScheduler

    from helpers import SD15_SCHEDULE, TEXT_WIDTH, save_folder, tiny_sd15_components
    from sd.serve.cache import SourceProblem, check_source
    folder = save_folder(tiny_sd15_components(TEXT_WIDTH), DDIMScheduler(**SD15_SCHEDULE), tmp_path / "folder")
    unet_only = tmp_path / "unet.safetensors"  # a UNet-only file in diffusers names, as SDXL-Lightning ships
    save_file({"conv_in.weight": torch.zeros(1)}, str(unet_only))
    for source in (folder, sdxl_single_file, tiny_checkpoint, unet_only):
        check_source(source)
    sd.load(folder, device="cpu")  # and it does load
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SourceProblem, match=r"vae/diffusion_pytorch_model.safetensors: not a safetensors file"):
        check_source(folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(SourceProblem, match=r"folder/vae: no .safetensors weights"):
        check_source(folder)
    (folder / "model_index.json").write_text("{")
    with pytest.raises(SourceProblem, match=r"model_index.json: not JSON"):
        check_source(folder)
