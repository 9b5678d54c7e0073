import json

import pytest
import torch

# The test models are tiny: thread start-up costs more than it saves, and on a busy 2-core
# machine two threads made the suite several times slower. Both sides of every comparison
# run under the same setting.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl_components() -> dict:
    """A tiny SDXL-shaped diffusers pipeline's parts, every parameter random: two text encoders (64 wide,
    CLIP-L's quick_gelu and bigG's gelu with a projection; the second tokenizer pads with "!"), a
    "text_time" UNet with attention on its second level (heads = channels // 64), the 0.13025 VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from helpers import TEXT_WIDTH, hf_text_config, randomize_params, tiny_sdxl_unet, tokenizers

    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(hf_text_config("quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(hf_text_config("gelu", projection_dim=TEXT_WIDTH))
    for seed, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        randomize_params(model, seed=seed)
    tokenizer, tokenizer_2 = tokenizers()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2)


@pytest.fixture(scope="session")
def sdxl_folder(tiny_sdxl_components, tmp_path_factory):
    """tiny_sdxl_components saved as a diffusers folder with SDXL's published scheduler settings (Euler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from helpers import SDXL_SCHEDULER

    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SDXL_SCHEDULER.items()
                                          if k not in ("clip_sample", "set_alpha_to_one", "skip_prk_steps",
                                                       "sample_max_value")})
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components, scheduler=scheduler, add_watermarker=False)
    path = tmp_path_factory.mktemp("sdxl-folder")
    pipe.save_pretrained(path)
    # save_pretrained of an in-memory EulerDiscreteScheduler writes only Euler's own options, so the DDIM
    # built from it by `DDIMScheduler.from_config` would take DDIM's defaults clip_sample=True (clamp x0 to
    # [-1, 1]) and set_alpha_to_one=True. The published SDXL scheduler_config.json states these four
    # values; write them as it does, so the folder is the real one's shape and both sides read the same.
    cfg_path = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny SD 1.5 single file of our own modules as torch initialises them, written by sd.writer."""
    from sd.clip import CLIPConfig, CLIPTextModel
    from sd.writer import write_single_file
    from sd.unet import UNet, UNetConfig
    from sd.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), heads=(8, 8),
                           context_dim=64))
    vae = AutoencoderKL(VAEConfig(channels=32, channel_mult=(1, 2)))
    clip = CLIPTextModel(CLIPConfig(width=64, layers=2, heads=1, mlp_width=37))
    return write_single_file(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", unet, vae, [clip])


@pytest.fixture(scope="session")
def sd15_single_file(tmp_path_factory):
    """Our own SD 1.5 models (helpers' UNET_TINY, VAE_TINY, CLIP_TINY_CFG), random, written by sd.writer
    in the official layout, plus the junk real files carry."""
    from helpers import CLIP_TINY_CFG, TEXT_KEY, UNET_KEY, UNET_TINY, VAE_TINY, randomize_params
    from sd.clip import CLIPTextModel
    from sd.writer import single_file_tensors, write_safetensors
    from sd.unet import UNet
    from sd.vae import AutoencoderKL

    models = [UNet(UNET_TINY), AutoencoderKL(VAE_TINY), CLIPTextModel(CLIP_TINY_CFG)]
    for seed, model in enumerate(models):
        randomize_params(model, seed=10 + seed)
    tensors = single_file_tensors(models[0], models[1], models[2:])
    gen = torch.Generator().manual_seed(99)
    unet_in = tensors[UNET_KEY + "input_blocks.0.0.weight"]
    junk = {
        TEXT_KEY + "embeddings.position_ids": torch.arange(77, dtype=torch.float32)[None] * 0.9999,  # corrupt floats
        "alphas_cumprod": torch.linspace(0.999, 0.005, 1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        # An EMA copy of one UNet weight (flattened name) that differs from the live one: must not be loaded.
        "model_ema.diffusion_modelinput_blocks00weight": torch.randn(unet_in.shape, generator=gen),
    }
    return write_safetensors(tmp_path_factory.mktemp("single-file") / "tiny-sd15.safetensors", {**tensors, **junk})


@pytest.fixture(scope="session")
def sdxl_single_file(tmp_path_factory):
    """Our own SDXL models (helpers' UNET_XL, VAE_XL, CLIP_L_TINY, BIG_G_TINY), random, written by sd.writer
    in the official SDXL layout (bigG in OpenCLIP names), plus the junk real files carry."""
    from helpers import BIG_G_KEY, BIG_G_TINY, CLIP_L_KEY, CLIP_L_TINY, UNET_XL, VAE_XL, randomize_params
    from sd.clip import CLIPTextModel
    from sd.writer import single_file_tensors, write_safetensors
    from sd.unet import UNet
    from sd.vae import AutoencoderKL

    models = [UNet(UNET_XL), AutoencoderKL(VAE_XL), CLIPTextModel(CLIP_L_TINY), CLIPTextModel(BIG_G_TINY)]
    for seed, model in enumerate(models):
        randomize_params(model, seed=20 + seed)
    junk = {
        CLIP_L_KEY + "text_model.embeddings.position_ids": torch.arange(77, dtype=torch.float32)[None] * 0.9999,
        BIG_G_KEY + "logit_scale": torch.tensor(4.6052),
        "alphas_cumprod": torch.linspace(0.999, 0.005, 1000),
        "betas": torch.linspace(0.00085, 0.012, 1000),
        "model_ema.decay": torch.tensor(0.9999),
    }
    return write_safetensors(tmp_path_factory.mktemp("sdxl-single-file") / "tiny-sdxl.safetensors",
                             {**single_file_tensors(models[0], models[1], models[2:]), **junk})
