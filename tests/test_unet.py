"""sd.unet.UNet vs diffusers' UNet2DConditionModel on tiny random-weight configs.

Our state dict is the official single-file (LDM) layout; diffusers' own
`convert_ldm_unet_checkpoint` turns it into a diffusers state dict, loaded with strict=True.
All parameters (GroupNorm / LayerNorm included) are randomised first, so nothing is identity.

Tolerance: fp32 on both sides, max |ours - ref| <= 1e-4 * max |ref| (relative to the output's scale).
"""

from dataclasses import asdict

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from helpers import assert_close_scaled, randomize_params, with_our_weights
from sd.unet import UNet, UNetConfig, timestep_embedding

REL = 1e-4  # fp32, relative to max |ref|

CONFIGS = {
    # SD 1.5-like: attention on the first levels only, conv proj_in/out.
    "l2-attn-first-conv": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                     transformer_depth=(1, 0), mid_transformer_depth=1, heads=(2, 4),
                                     context_dim=32, linear_proj=False, norm_groups=8),
    # Attention on the last level only (and in the middle), linear proj, 2 res blocks, groups 32.
    "l2-attn-last-linear": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                                      transformer_depth=(0, 1), mid_transformer_depth=1, heads=(4, 8),
                                      context_dim=48, linear_proj=True, norm_groups=32),
    # Three levels, no attention on the last one, deeper mid transformer.
    "l3-mid2-conv": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                               transformer_depth=(1, 1, 0), mid_transformer_depth=2, heads=(2, 4, 8),
                               context_dim=48, linear_proj=False, norm_groups=8),
    # Inpainting form: 9 input channels, 2 transformer layers on one level, linear proj.
    "l3-inpaint9-linear": UNetConfig(in_channels=9, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                                     num_res_blocks=2, transformer_depth=(1, 2, 1), mid_transformer_depth=1,
                                     heads=(2, 4, 4), context_dim=32, linear_proj=True, norm_groups=16),
}

# SDXL-like: pooled text 32 wide + 6 size/crop numbers embedded 8 wide each.
TEXT_EMBED_DIM, TIME_EMBED_DIM = 32, 8
SDXL_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
                       mid_transformer_depth=2, heads=(2, 4), context_dim=48, linear_proj=True,
                       adm_in_channels=TEXT_EMBED_DIM + 6 * TIME_EMBED_DIM, norm_groups=8)


def diffusers_config(cfg: UNetConfig, sample_size=16) -> dict:
    levels = len(cfg.channel_mult)
    depth = list(cfg.transformer_depth)
    # diffusers gives its mid block the last level's transformer depth; where the last level has no
    # attention that entry is free, so it carries the mid depth.
    if depth[-1] == 0:
        depth[-1] = cfg.mid_transformer_depth
    assert depth[-1] == cfg.mid_transformer_depth, "not expressible in diffusers"
    depth = [d if d else 1 for d in depth]  # unused on levels without attention
    down = tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth)
    up = tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth))
    config = dict(
        sample_size=sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=tuple(depth),
        attention_head_dim=tuple(cfg.heads),  # diffusers' legacy name: the number of heads
        cross_attention_dim=cfg.context_dim,
        use_linear_projection=cfg.linear_proj,
        norm_num_groups=cfg.norm_groups,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    assert len(down) == levels
    if cfg.adm_in_channels:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return config


_CACHE = {}


def build(cfg: UNetConfig, seed=0):
    key = (tuple(sorted(asdict(cfg).items())), seed)
    if key in _CACHE:
        return _CACHE[key]
    torch.manual_seed(seed)
    ours = randomize_params(UNet(cfg), seed=seed).eval()
    config = diffusers_config(cfg)
    _CACHE[key] = ours, with_our_weights(UNet2DConditionModel(**config), ours, convert_ldm_unet_checkpoint,
                                         "model.diffusion_model.", config)
    return _CACHE[key]


def inputs(cfg, h, w, t, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=gen)
    context = torch.randn(batch, 77, cfg.context_dim, generator=gen)
    t = torch.as_tensor(t, dtype=torch.float32 if isinstance(t, float) else torch.long)
    t = t.expand(batch) if t.dim() == 0 else t
    return x, t, context


ODD_SHAPES = {2: (15, 9), 3: (18, 14)}  # not a multiple of 2**(levels-1): upsample to the skip's size
# (timestep, latent shape): integer, fractional and per-sample timesteps, each on its own non-square shape.
CASES = {
    "t999-16x24": (999, (16, 24)),
    "t523.7-odd": (523.7, "odd"),
    "t-per-sample-24x16": ([1, 640], (24, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(name, case):
    cfg = CONFIGS[name]
    ours, ref = build(cfg)
    t, shape = CASES[case]
    h, w = ODD_SHAPES[len(cfg.channel_mult)] if shape == "odd" else shape
    x, tt, context = inputs(cfg, h, w, t)
    with torch.no_grad():
        got = ours(x, tt, context)
        want = ref(x, tt, encoder_hidden_states=context).sample
    assert got.shape == (2, cfg.out_channels, h, w)
    assert_close_scaled(got, want, REL, f"unet {name} t={t} {h}x{w}")


def test_unet_odd_size_really_needs_skip_sizes():
    """The odd shapes above do exercise the upsample-to-skip-size path: a plain 2x upsample would
    not give the skip connection's size."""
    for levels, (h, w) in ODD_SHAPES.items():
        sizes = [(h, w)]
        for _ in range(levels - 1):
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        assert any((2 * a, 2 * b) != c for (a, b), c in zip(sizes[1:], sizes[:-1]))


def test_unet_scalar_timestep():
    cfg = CONFIGS["l2-attn-first-conv"]
    ours, ref = build(cfg)
    x, _, context = inputs(cfg, 16, 24, 0)
    with torch.no_grad():
        got = ours(x, torch.tensor(321.5), context)
        want = ref(x, torch.tensor(321.5), encoder_hidden_states=context).sample
    assert_close_scaled(got, want, REL, "unet scalar t")


def test_unet_timestep_and_context_matter():
    """Guard against a test that passes because the output ignores its conditioning."""
    cfg = CONFIGS["l2-attn-first-conv"]
    ours, _ = build(cfg)
    x, t, context = inputs(cfg, 16, 24, 500)
    with torch.no_grad():
        base = ours(x, t, context)
        scale = base.abs().max().item()
        # (Cross-attention is blind to the order of context tokens, so change their values.)
        for changed in (ours(x, t + 1, context), ours(x, t, context.roll(1, dims=0))):
            assert (changed - base).abs().max().item() > 1e-3 * scale


def sdxl_y(text_embeds, time_ids):
    # pooled text, then each of the 6 size / crop numbers embedded TIME_EMBED_DIM wide, flattened
    emb = timestep_embedding(time_ids.flatten(), TIME_EMBED_DIM).reshape(len(time_ids), -1)
    return torch.cat([text_embeds, emb], -1)


@pytest.mark.parametrize("case", ["t999-16x24", "t523.7-odd"])
def test_sdxl_like_unet_matches_diffusers(case):
    cfg = SDXL_TINY
    ours, ref = build(cfg)
    t, shape = CASES[case]
    h, w = ODD_SHAPES[2] if shape == "odd" else shape
    gen = torch.Generator().manual_seed(2)
    text_embeds = torch.randn(2, TEXT_EMBED_DIM, generator=gen)
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0], [96.0, 40.0, 3.0, 5.0, 80.0, 40.0]])
    y = sdxl_y(text_embeds, time_ids)
    assert y.shape == (2, cfg.adm_in_channels)
    x, tt, context = inputs(cfg, h, w, t)
    with torch.no_grad():
        got = ours(x, tt, context, y=y)
        want = ref(x, tt, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    assert_close_scaled(got, want, REL, f"unet sdxl-tiny t={t} {h}x{w}")
    # The size conditioning must reach the output.
    with torch.no_grad():
        other = ours(x, tt, context, y=sdxl_y(text_embeds, time_ids + 8))
    assert (other - got).abs().max().item() > 1e-3 * got.abs().max().item()


@pytest.mark.parametrize("side", [1, 4, 7, 8, 9, 16])
def test_conv3x3_equals_the_convolution_on_every_map_size(side):
    """Maps up to 8x8 take the unfold + matmul path on the CPU, larger ones torch's convolution."""
    from sd.unet import Conv3x3
    torch.manual_seed(side)
    conv = Conv3x3(12, 20)
    x = torch.randn(2, 12, side, side + 1 if side < 8 else side, requires_grad=True)
    y = conv(x)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(y.square().sum(), x)  # training goes through it too
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
