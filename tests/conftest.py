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
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from helpers import randomize_params
    from sd.tokenizer import ASSETS

    width, time_dim = 64, 8

    def text_config(act, **kw):
        return CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=1, num_hidden_layers=3,
                              vocab_size=49408, max_position_embeddings=77, hidden_act=act, **kw)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=2 * width, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width + 6 * time_dim, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(text_config("quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config("gelu", projection_dim=width))
    for seed, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        randomize_params(model, seed=seed)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77),
                tokenizer_2=CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77, pad_token="!"))
