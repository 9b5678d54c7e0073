"""The latent-diffusion UNet (Rombach et al. 2022) for SD 1.5, SD 1.5 inpainting and SDXL.

Attribute paths equal the official single-file keys under
`model.diffusion_model.` (`input_blocks.1.1.transformer_blocks.0.attn2.to_k`),
so those files load with `load_state_dict(strict=True)` and no renaming.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .interrupt import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention at that level
    mid_transformer_depth: int = 1
    heads: tuple[int, ...] = (8, 8, 8, 8)             # per level; the middle block uses the last
    context_dim: int = 768                              # width of the text embeddings
    linear_proj: bool = False                           # SDXL: Linear proj_in/out instead of 1x1 convs
    adm_in_channels: int | None = None                  # SDXL: pooled text + size/crop embedding
    norm_groups: int = 32
    time_cond_proj_dim: int | None = None               # LCM-distilled UNets: width of the guidance embedding


SD15 = UNetConfig()
SD15_INPAINT = replace(SD15, in_channels=9)  # latents + mask + masked-image latents
SDXL = UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), mid_transformer_depth=10,
                  heads=(5, 10, 20), context_dim=2048, linear_proj=True, adm_in_channels=2816)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cosines first, as LDM and diffusers'
    `flip_sin_to_cos=True, freq_shift=0`."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance weight w (Luo et al. 2023, as diffusers'
    `get_guidance_scale_embedding`): w scaled by 1000, sines first, frequencies over half - 1."""
    half = dim // 2
    # In this order, in float32: w * 1000 reaches 1e4, where a last-bit change in a frequency moves sin by 1e-3.
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


class Conv3x3(nn.Conv2d):
    """A 3x3 convolution (stride 1, padding 1). On the CPU in float32, maps of 8x8 or less go
    through one matrix multiply over unfolded patches: there oneDNN's convolution reaches
    26 GFLOP/s on SD 1.5's 4x4x1280 maps (82 on 8x8) on a 2-core Xeon where this reaches 100
    (160), and the UNet step at 256x256 takes 0.73x the time. On larger maps oneDNN is as fast
    or faster, and in bfloat16 (AMX) it is faster on every map: that UNet step took 1.57 s with
    oneDNN alone and 1.80 s with this path."""

    def __init__(self, ch: int, out_ch: int):
        super().__init__(ch, out_ch, 3, padding=1)

    def forward(self, x):
        B, _, H, W = x.shape
        if x.device.type != "cpu" or x.dtype != torch.float32 or H * W > 64:
            return super().forward(x)
        y = self.weight.flatten(1) @ F.unfold(x, 3, padding=1)  # (out, C*9) @ (B, C*9, H*W)
        return y.add_(self.bias[:, None]).view(B, -1, H, W)


class ResBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int, emb_ch: int, groups: int):
        super().__init__()
        # SiLU in place on the norms' fresh outputs; not on `emb`, which every block shares.
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(inplace=True),
                                       Conv3x3(ch, out_ch))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        # Identity at index 2 stands where LDM keeps a (parameter-free) Dropout.
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(inplace=True), nn.Identity(),
                                        Conv3x3(out_ch, out_ch))
        self.skip_connection = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x).add_(self.emb_layers(emb)[:, :, None, None])
        return self.out_layers(h).add_(self.skip_connection(x))


# Query-key pairs per SDPA call, over batch and heads. Past the native size one call scores
# billions: at 2048x2048 SD 1.5's first level, 2 x 8 heads x 65536^2, 3.5 minutes on a 2-core CPU.
ATTENTION_CHUNK = 2 ** 28


def attention(q, k, v):
    """SDPA over (B, heads, T, d); a call that would score more than ATTENTION_CHUNK pairs runs
    in chunks of query rows with a checkpoint between them, so that a job given up stops within
    a chunk (about a second on a 2-core CPU) rather than minutes. Each row's softmax is over all
    the keys either way: the same numbers, up to float rounding. Compiled code makes one call."""
    B, H, T, _ = q.shape
    rows = max(1, ATTENTION_CHUNK // (B * H * k.shape[2]))
    if rows >= T or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    for i in range(0, T, rows):
        checkpoint()
        out[:, :, i:i + rows] = F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v)
    return out


class Attention(nn.Module):
    """Multi-head attention; keys and values from `context` (cross) or from `x` (self)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        B, T, C = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (a.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for a in (q, k, v))  # (B, nh, T, hs)
        y = attention(q, k, v)
        return self.to_out[0](y.transpose(1, 2).reshape(B, T, C))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives both the value and its gate."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a residual."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, linear: bool, groups: int):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(ch, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            checkpoint()
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv3x3(ch, ch)

    def forward(self, x, size):
        # Upsampling to the skip connection's size keeps odd latent sizes working.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: each layer gets what it needs."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            checkpoint()  # a job given up stops here, not a whole step later (sd/interrupt.py)
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class DeepCache:
    """DeepCache (Ma et al. 2024): the UNet's deep features change slowly from step to step, so
    only every `interval`-th call runs the whole UNet; the calls between run just its shallowest
    `depth` input blocks and the output blocks that read their skips, on the deep feature the
    last whole call left (the input of output block -depth). One object per sampling run: it
    counts the calls it sees, and an input of another shape starts afresh."""

    def __init__(self, interval: int = 3, depth: int = 2):
        self.interval, self.depth = interval, depth
        self.calls, self.feature, self.shape = 0, None, None

    def reuse(self, x: torch.Tensor) -> bool:
        """Whether this call may run the shallow branch on the cached feature."""
        shallow = self.calls % self.interval != 0 and self.feature is not None and self.shape == x.shape
        self.calls += 1
        return shallow

    def keep(self, feature: torch.Tensor, x: torch.Tensor):
        self.feature, self.shape = feature, x.shape


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = SD15):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_ch = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.time_cond_proj_dim:  # no LDM name exists for it; diffusers calls it time_embedding.cond_proj
            self.time_cond_proj = nn.Linear(cfg.time_cond_proj_dim, mc, bias=False)
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)))

        def transformer(ch, level, depth):
            return SpatialTransformer(ch, cfg.heads[level], depth, cfg.context_dim, cfg.linear_proj, groups)

        self.input_blocks = nn.ModuleList([Block(Conv3x3(cfg.in_channels, mc))])
        skip_chans, ch = [mc], mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mc * mult, emb_ch, groups)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, level, cfg.transformer_depth[level]))
                self.input_blocks.append(Block(*layers))
                skip_chans.append(ch)
            if level != last:
                self.input_blocks.append(Block(Downsample(ch)))
                skip_chans.append(ch)

        self.middle_block = Block(ResBlock(ch, ch, emb_ch, groups), transformer(ch, last, cfg.mid_transformer_depth),
                                  ResBlock(ch, ch, emb_ch, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), mc * mult, emb_ch, groups)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, level, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(inplace=True),
                                 Conv3x3(ch, cfg.out_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                w: torch.Tensor | None = None, cache: DeepCache | None = None):
        """x: (B, in_channels, h, w) latents; t: (B,) or () timesteps; context: (B, 77, context_dim);
        y: (B, adm_in_channels) for SDXL; w: (B,) guidance weight (guidance scale - 1) for
        LCM-distilled UNets; cache: a DeepCache that may skip the deep blocks. Returns
        (B, out_channels, h, w)."""
        t = t.reshape(-1).expand(x.shape[0])
        t_emb = timestep_embedding(t, self.cfg.model_channels).to(x.dtype)
        if self.cfg.time_cond_proj_dim:
            if w is None:
                raise ValueError("w: a guidance-distilled UNet (time_cond_proj_dim) needs the guidance weight")
            w_emb = guidance_embedding(w.reshape(-1).expand(x.shape[0]), self.cfg.time_cond_proj_dim)
            t_emb = t_emb + self.time_cond_proj(w_emb.to(x.dtype))
        emb = self.time_embed(t_emb)
        if self.cfg.adm_in_channels:
            emb = emb + self.label_emb(y.to(x.dtype))
        shallow = cache is not None and cache.reuse(x)
        branch = len(self.output_blocks) - cache.depth if cache is not None else None
        skips, h = [], x
        for block in self.input_blocks[:cache.depth] if shallow else self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = cache.feature if shallow else self.middle_block(h, emb, context)
        for j in range(branch if shallow else 0, len(self.output_blocks)):
            if j == branch and not shallow:
                cache.keep(h, x)
            h = torch.cat([h, skips.pop()], dim=1)
            h = self.output_blocks[j](h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
