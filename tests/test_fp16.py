"""SDXL's VAE overflows float16 (activations past 65504 turn into inf, then NaN). The pipeline
keeps such a VAE in float32 when it runs in float16. On the CPU this shows the dtype path on a
tiny VAE made to overflow the same way; on a GPU, a whole float16 SDXL generation."""

import pytest
import torch

import sd
from sd.clip import CLIPConfig, CLIPTextModel
from sd.writer import write_single_file
from sd.unet import UNet, UNetConfig
from sd.vae import AutoencoderKL, VAEConfig


def tiny_sdxl_file(path, overflow: bool):
    """A tiny SDXL single file; `overflow` scales the decoder's first convolution so its
    activations reach ~1e5, past float16's range, as the published SDXL VAE's do."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=64, channel_mult=(1, 2), transformer_depth=(0, 1), mid_transformer_depth=1,
                           heads=(1, 2), context_dim=128, linear_proj=True, adm_in_channels=64 + 6 * 8))
    vae = AutoencoderKL(VAEConfig(channels=32, channel_mult=(1, 2), scaling_factor=0.13025)).requires_grad_(False)
    if overflow:
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    clip_l = CLIPTextModel(CLIPConfig(width=64, layers=2, heads=1, mlp_width=37))
    big_g = CLIPTextModel(CLIPConfig(width=64, layers=2, heads=1, mlp_width=37, act="gelu", projection_dim=64))
    return write_single_file(path, unet, vae, [clip_l, big_g])


def test_float16_pipeline_decodes_sdxl_latents_in_float32(tmp_path):
    pipe = sd.load(tiny_sdxl_file(tmp_path / "xl.safetensors", overflow=True), device="cpu", dtype=torch.float16)
    assert pipe.unet.out[2].weight.dtype == torch.float16  # the UNet runs in float16 ...
    assert pipe.vae_dtype == torch.float32 and all(p.dtype == torch.float32 for p in pipe.vae.parameters())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * pipe.vae.cfg.scaling_factor
    with torch.inference_mode():
        naive = pipe.vae.to(torch.float16).decode((latents / pipe.vae.cfg.scaling_factor).half())
        pipe.vae.to(torch.float32)
    assert not torch.isfinite(naive).all()  # ... where a float16 VAE overflows,
    image = pipe.decode(latents)[0]         # the pipeline's float32 VAE does not.
    assert image.size == (16, 16) and len(set(image.getdata())) > 1


def test_float32_pipeline_keeps_everything_float32(tmp_path):
    pipe = sd.load(tiny_sdxl_file(tmp_path / "xl.safetensors", overflow=False), device="cpu")
    assert pipe.dtype == pipe.vae_dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_sdxl_generation_is_finite(tmp_path, dtype):
    pipe = sd.load(tiny_sdxl_file(tmp_path / "xl.safetensors", overflow=True), device="cuda", dtype=dtype)
    image = pipe.generate("a red circle", width=64, height=64, num_steps=4, seed=0)
    assert len(set(image.getdata())) > 1  # NaN latents decode to one flat colour
