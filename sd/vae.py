"""AutoencoderKL (Rombach et al. 2022): image <-> latent distribution. Names follow the
official single-file keys under `first_stage_model.` (`encoder.down.0.block.1.conv2`)."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .interrupt import checkpoint


@dataclass(frozen=True)
class VAEConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    image_channels: int = 3
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # SD 1.5; SDXL's VAE uses 0.13025


VAE_SD15 = VAEConfig()
VAE_SDXL = VAEConfig(scaling_factor=0.13025)


def norm(groups: int, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = norm(groups, ch), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm(groups, out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x):
        # In place where the overwritten tensor is needed by no one (autograd included): at
        # 512x512 each saves a fresh 32-128 MiB tensor.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v are 1x1 convolutions."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = norm(groups, ch)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # The 1x1 convolutions applied as linears on the tokens: q, k and v come out contiguous
        # along C, which SDPA's fused CPU kernel needs (strided ones fall back to a slower path).
        q, k, v = (F.linear(tokens, p.weight[:, :, 0, 0], p.bias)[:, None] for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        h = F.linear(h, self.proj_out.weight[:, :, 0, 0], self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: resnet blocks, then an optional resampler (`downsample` or `upsample`)."""

    def __init__(self, chans: list[int], groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(chans, chans[1:]))
        if resample == "down":
            self.downsample = Downsample(chans[-1])
        elif resample == "up":
            self.upsample = Upsample(chans[-1])

    def forward(self, x):
        for block in self.block:
            checkpoint()  # a job given up stops here, not after the whole decode (sd/interrupt.py)
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.channels, 3, padding=1)
        ins = [cfg.channels] + widths[:-1]
        self.down = nn.ModuleList(
            Level([i] + [w] * cfg.num_res_blocks, g, "down" if n < len(widths) - 1 else None)
            for n, (i, w) in enumerate(zip(ins, widths)))
        self.mid = Mid(widths[-1], g)
        self.norm_out = norm(g, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x)), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g)
        # up[n] works at the resolution of encoder level n; it runs from the last level to the first.
        ins = widths[1:] + [widths[-1]]
        self.up = nn.ModuleList(
            Level([i] + [w] * (cfg.num_res_blocks + 1), g, "up" if n > 0 else None)
            for n, (i, w) in enumerate(zip(ins, widths)))
        self.norm_out = norm(g, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.image_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


@dataclass
class LatentDistribution:
    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Noise drawn in float32 on the generator's device, as diffusers' randn_tensor does on the CPU.
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else "cpu")
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAE_SD15):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def scale(self) -> int:
        """Image pixels per latent pixel, along a side (8 for SD)."""
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def encode(self, x: torch.Tensor, tile: int | None = None) -> LatentDistribution:
        """x: (B, 3, H, W) in [-1, 1] -> distribution over (B, 4, H/8, W/8) unscaled latents.
        `tile` (latent pixels): an image with a side over tile * 8 is encoded in tiles."""
        def encode(x):
            return self.quant_conv(self.encoder(x))
        if tile and max(x.shape[-2:]) > tile * self.scale:
            moments = run_tiled(encode, x, tile * self.scale, 1 / self.scale)
        else:
            moments = encode(x)
        mean, logvar = moments.chunk(2, dim=1)
        return LatentDistribution(mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)))

    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """z: (B, 4, h, w) unscaled latents -> (B, 3, 8h, 8w) image in about [-1, 1].
        `tile` (latent pixels): latents with a side over it are decoded in tiles."""
        def decode(z):
            return self.decoder(self.post_quant_conv(z))
        if tile and max(z.shape[-2:]) > tile:
            return run_tiled(decode, z, tile, self.scale)
        return decode(z)


TILE_OVERLAP = 0.25  # of a tile's side, as diffusers' tile_overlap_factor


def run_tiled(fn, x: torch.Tensor, tile: int, scale: float) -> torch.Tensor:
    """`fn` (which scales sides by `scale`) applied to overlapping tiles of `x`, so its memory
    use is that of one tile whatever the size of x. Tiles of side `tile` start every 3/4 tile;
    each result tile fades in from its upper and left neighbours over their 1/4 overlap, then
    keeps its first 3/4: the seams, where each tile's own GroupNorm statistics would show, are
    blended away. The same arithmetic as diffusers' tiled_encode / tiled_decode, but only the
    row above is kept in memory."""
    stride, out_tile = int(tile * (1 - TILE_OVERLAP)), int(tile * scale)
    blend = int(out_tile * TILE_OVERLAP)
    keep = out_tile - blend
    rows, above = [], None
    for top in range(0, x.shape[-2], stride):
        row = []
        for n, left in enumerate(range(0, x.shape[-1], stride)):
            checkpoint()
            out = fn(x[..., top:top + tile, left:left + tile])
            if above is not None:
                fade_in(above[n], out, blend, dim=-2)
            if row:
                fade_in(row[-1], out, blend, dim=-1)
            row.append(out)
        rows.append(torch.cat([out[..., :keep, :keep] for out in row], dim=-1))
        above = row
    return torch.cat(rows, dim=-2)


def fade_in(before: torch.Tensor, tile: torch.Tensor, width: int, dim: int):
    """In place: `tile`'s first `width` rows (dim -2) or columns (dim -1) go linearly from the
    matching last ones of `before`, its overlapping neighbour, to its own."""
    width = min(before.shape[dim], tile.shape[dim], width)
    w = torch.arange(width, device=tile.device, dtype=torch.float32) / width
    w = w[:, None] if dim == -2 else w
    head = tile.narrow(dim, 0, width)
    head.copy_(before.narrow(dim, before.shape[dim] - width, width) * (1 - w) + head * w)
