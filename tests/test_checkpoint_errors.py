"""Checkpoints that don't fit say so, naming the file and every key at fault (issue 16, item 9),
and a replacement UNet takes its base's config, head counts included (issue 15, part 3)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

import sd
from helpers import assert_same_image, randomize_params, tiny_sd15_components
from sd.tiny import CHECKPOINT

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(CHECKPOINT))


def written(tmp_path, tensors, name="broken.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("key", ["out.2.weight", "input_blocks.0.0.weight", "middle_block.1.proj_in.weight",
                                 "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"])
def test_a_missing_tensor_is_named_with_the_file(tmp_path, tensors, key):
    """Whichever tensor is missing, even one the config is read from, the error is a CheckpointError
    naming the file and listing the key, never a bare KeyError."""
    path = written(tmp_path, {k: v for k, v in tensors.items() if k != UNET + key})
    with pytest.raises(sd.CheckpointError) as e:
        sd.load(path, device="cpu")
    assert str(path) in str(e.value) and key in str(e.value), str(e.value)


def test_a_wrongly_shaped_tensor_is_named_with_the_file(tmp_path, tensors):
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    path = written(tmp_path, {**tensors, key: tensors[key][:, :-1]})
    with pytest.raises(sd.CheckpointError, match=r"wrong shapes \(1\): input_blocks\.1\.1\..*attn1\.to_q\.weight") as e:
        sd.load(path, device="cpu")
    assert str(path) in str(e.value)


def test_an_unexpected_tensor_is_named(tmp_path, tensors):
    path = written(tmp_path, {**tensors, UNET + "input_blocks.1.0.extra.weight": torch.zeros(3)})
    with pytest.raises(sd.CheckpointError, match=r"unexpected keys \(1\): input_blocks\.1\.0\.extra\.weight"):
        sd.load(path, device="cpu")


def test_parts_that_do_not_fit_each_other(tmp_path, tensors):
    """A UNet whose output width the config follows (so no key is missing) still has to fit the VAE."""
    key = UNET + "out.2.weight"
    path = written(tmp_path, {**tensors, key: torch.cat([tensors[key]] * 2), UNET + "out.2.bias":
                              torch.cat([tensors[UNET + "out.2.bias"]] * 2)})
    with pytest.raises(sd.CheckpointError, match="the UNet predicts 8 channels, the VAE's latents have 4") as e:
        sd.load(path, device="cpu")
    assert str(path) in str(e.value)


# ---------------------------------------------------------------- replacement UNets


def odd_heads_unet(seed: int) -> UNet2DConditionModel:
    """SD 1.5's shape at toy size, but 2 heads per level where SD 1.5's rule says 8: weights alone
    cannot tell, so only the base model's config gets it right."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=2, norm_num_groups=32)
    return randomize_params(unet, seed=seed)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("odd-heads")
    parts = {**tiny_sd15_components(), "unet": odd_heads_unet(0)}
    StableDiffusionPipeline(**parts, scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                                             beta_schedule="scaled_linear", steps_offset=1,
                                                             clip_sample=False, set_alpha_to_one=False),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    replacement = odd_heads_unet(5)
    unet_file = path / "replacement_unet.safetensors"
    save_file({k: v.contiguous() for k, v in replacement.state_dict().items()}, str(unet_file))
    return path, unet_file, replacement


def reference_image(folder, unet):
    ref = StableDiffusionPipeline.from_pretrained(folder, unet=unet, safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref("a red circle", width=64, height=48, num_inference_steps=4, guidance_scale=6.0,
               generator=torch.Generator("cpu").manual_seed(1), output_type="np").images[0]


KW = dict(width=64, height=48, num_steps=4, guidance=6.0, seed=1)


def test_replacement_unet_takes_the_folders_head_counts(odd_folder):
    folder, unet_file, replacement = odd_folder
    ours = sd.load(folder, unet=unet_file, device="cpu")
    assert ours.unet.cfg.heads[:2] == (2, 2)
    assert_same_image(ours.generate("a red circle", **KW), reference_image(folder, replacement), "unet= on a folder")


def test_with_unet_takes_the_pipelines_head_counts(odd_folder):
    folder, unet_file, replacement = odd_folder
    swapped = sd.load(folder, device="cpu").with_unet(unet_file)
    assert_same_image(swapped.generate("a red circle", **KW), reference_image(folder, replacement), "with_unet")


def test_heads_by_the_family_rule_would_differ(odd_folder):
    """The check above can fail: SD 1.5's rule (8 heads) on these weights gives another picture."""
    folder, unet_file, _ = odd_folder
    ours = sd.load(folder, unet=unet_file, device="cpu")
    ruled = ours.with_unet(unet_file)
    from sd.weights import read_unet_file, unet_config_from_weights
    state = read_unet_file(unet_file)
    ruled.unet = sd.weights.build(sd.unet.UNet, unet_config_from_weights(state, "sd15"), state, "UNet", "rule")
    a = np.asarray(ours.generate("a red circle", **KW), dtype=int)
    b = np.asarray(ruled.generate("a red circle", **KW), dtype=int)
    assert np.abs(a - b).max() > 2


def test_a_replacement_that_does_not_fit_the_base_config_says_so(odd_folder, tmp_path):
    folder, _, _ = odd_folder
    torch.manual_seed(3)
    other = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                 attention_head_dim=8, norm_num_groups=32)
    path = tmp_path / "other_unet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.warns(UserWarning, match="do not fit the model's UNet config"):
        pipe = sd.load(folder, unet=path, device="cpu")
    assert pipe.unet.cfg.num_res_blocks == 1 and pipe.unet.cfg.heads[:2] == (8, 8)
