"""Train the tiny shapes model that ships in sd/assets/: latent diffusion end to end, on a CPU.

    python scripts/train_tiny.py                      # about 40 minutes on 2 CPU cores
    python scripts/train_tiny.py --device cuda        # minutes on a GPU

The recipe is Stable Diffusion's (Rombach et al. 2022), scaled down to captioned pictures of
coloured shapes (sd/shapes.py) at 64x64, with the project's own modules:

1. An autoencoder (sd.vae.AutoencoderKL, 4 levels, so 64x64x3 <-> 8x8x4) trained to reconstruct
   the pictures, with a small KL term that keeps the latent space smooth.
2. Its latent space rescaled so that SD 1.5's scaling factor (0.18215) gives unit variance: an
   exact reparametrisation of two 1x1 convolutions, so the checkpoint needs no special factor.
3. A text encoder (sd.clip.CLIPTextModel, the real CLIP tokenizer) and a UNet (sd.unet.UNet,
   SD 1.5's architecture: ResBlocks, self- and cross-attention, skip connections) trained
   together, as LDM trained its text encoder, on the DDPM objective: predict the noise added
   to a latent at a random timestep of SD's schedule. One caption in ten is dropped to "", so
   classifier-free guidance works. Offset noise (Guttenberg 2023) lets the model choose the
   background colour: SD's schedule never fully erases a latent's mean, and a model trained on it
   alone keeps whatever mean the starting noise has.
4. The exponential moving average of those weights is saved in the official single-file layout,
   in float16: sd.load reads it like any SD 1.5 checkpoint.

It writes the checkpoint, the loss log (JSON) and a loss-curve PNG.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sd import shapes
from sd.clip import CLIPConfig, CLIPTextModel
from sd.writer import write_single_file
from sd.schedule import ScheduleConfig, alphas_cumprod
from sd.tiny import CHECKPOINT, PRESET_KEY, PRESET_NAME
from sd.tokenizer import Tokenizer
from sd.unet import UNet, UNetConfig
from sd.vae import VAE_SD15, AutoencoderKL, VAEConfig

# Sizes chosen to train in well under an hour on 2 cores and to fit in 20 MB as float16. The text
# encoder is mostly its 49408 x 64 token table: the real CLIP vocabulary, of which the captions
# use a few dozen words. Head counts follow SD 1.5's rules (8 per UNet level, 64 channels per
# CLIP head), so the loader reads this configuration off the tensors.
VAE_CONFIG = VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
CLIP_CONFIG = CLIPConfig(width=64, layers=2, heads=1, mlp_width=256)
UNET_CONFIG = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                         heads=(8, 8), context_dim=64)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=CHECKPOINT, help="checkpoint to write (default: the shipped one)")
    p.add_argument("--log-dir", type=Path, default=Path("docs/tiny"), help="where the loss log and curve go")
    p.add_argument("--images", type=int, default=20000, help="pictures in the training set")
    p.add_argument("--vae-steps", type=int, default=1600)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2200, help="diffusion training steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998, help="decay of the weights' moving average")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


class Log:
    """Losses per step, and a progress line every `every` steps with the time left."""

    def __init__(self, every: int = 50):
        self.every, self.start, self.losses = every, time.time(), {}

    def __call__(self, phase: str, step: int, total: int, loss: float):
        self.losses.setdefault(phase, []).append(loss)
        if (step + 1) % self.every == 0 or step + 1 == total:
            recent = np.mean(self.losses[phase][-self.every:])
            elapsed = time.time() - self.start
            print(f"{phase} {step + 1}/{total} loss {recent:.4f}  {elapsed / 60:.1f} min", flush=True)


def learning_rate(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pixels(images: np.ndarray, device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(images: np.ndarray, args, log: Log) -> AutoencoderKL:
    vae = AutoencoderKL(VAE_CONFIG).to(args.device)
    with torch.no_grad():  # start with little posterior noise, or the decoder first sees mostly noise
        vae.quant_conv.bias[VAE_CONFIG.latent_channels:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 1)
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.vae_steps, args.lr)
        x = pixels(images[rng.integers(0, len(images), args.vae_batch)], args.device)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample())
        # Reconstruction (L1 keeps edges sharp, MSE keeps colours right), weighted towards the
        # shape: it covers a few percent of the pixels but carries most of what a caption says.
        # The corner pixel is always background (no position reaches a corner).
        shape = ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.05).float()
        weight = 1 + 4 * shape
        error = (recon - x).abs()
        # Plus a KL term that is small, as in SD's autoencoder: it keeps the latent space smooth
        # without blurring the pictures.
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - 2 * posterior.std.log()).mean()
        loss = (weight * (error + error ** 2)).mean() / weight.mean() + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("vae", step, args.vae_steps, loss.item())
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def check_autoencoder(vae: AutoencoderKL, args, n: int = 256):
    """How well unseen pictures survive the round trip: pixel error, and how often the shape's
    colour, the background and the shape's kind still read back right. Saves a few, above
    their reconstructions, to autoencoder.png."""
    images, _, scenes = shapes.sample(args.seed + 100, n)
    recon = vae.decode(vae.encode(pixels(images, args.device)).mean)
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    error = np.abs(recon.astype(np.float32) - images).mean()
    reads = [shapes.read_scene(r) for r in recon]
    kept = {key: np.mean([r[key] == getattr(s, key) for r, s in zip(reads, scenes)])
            for key in ("colour", "background", "shape")}
    print(f"autoencoder on {n} unseen pictures: mean error {error:.2f} of 255; read back right: "
          + ", ".join(f"{k} {v:.0%}" for k, v in kept.items()), flush=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    rows = [np.concatenate(list(images[:8]), axis=1), np.concatenate(list(recon[:8]), axis=1)]
    Image.fromarray(np.concatenate(rows)).resize((8 * 64 * 2, 2 * 64 * 2), Image.NEAREST).save(
        args.log_dir / "autoencoder.png")


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, images: np.ndarray, device) -> float:
    """Scale the latent space by a so that latents times SD 1.5's scaling factor have unit
    standard deviation: the encoder's mean and log-variance outputs become a*mean and
    logvar + 2 ln a, and the decoder's first 1x1 convolution divides its input by a. The
    decoded pictures do not change. Returns a."""
    a = 1 / (VAE_SD15.scaling_factor * latent_means(vae, images[:2048], device).std().item())
    c = vae.cfg.latent_channels
    vae.quant_conv.weight[:c] *= a
    vae.quant_conv.bias[:c] *= a
    vae.quant_conv.bias[c:] += 2 * math.log(a)
    vae.post_quant_conv.weight /= a
    return a


@torch.no_grad()
def latent_means(vae: AutoencoderKL, images: np.ndarray, device, batch: int = 256) -> torch.Tensor:
    """The posterior's mean for every picture (its spread is tiny), unscaled."""
    return torch.cat([vae.encode(pixels(images[i:i + batch], device)).mean for i in range(0, len(images), batch)])


def train_diffusion(latents: torch.Tensor, scenes: list, args, log: Log) -> tuple[UNet, CLIPTextModel]:
    unet, clip = UNet(UNET_CONFIG).to(args.device), CLIPTextModel(CLIP_CONFIG).to(args.device)
    params = list(unet.parameters()) + list(clip.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    tokenizer = Tokenizer()
    abar = alphas_cumprod(ScheduleConfig()).to(args.device)  # SD 1.5's training schedule
    rng = np.random.default_rng(args.seed + 2)
    gen = torch.Generator(args.device).manual_seed(args.seed + 3)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        idx = rng.integers(0, len(latents), args.batch)
        captions = ["" if rng.random() < 0.1 else shapes.random_caption(scenes[i], rng) for i in idx]
        z0 = latents[idx]
        t = torch.randint(0, len(abar), (args.batch,), generator=gen, device=args.device)
        noise = torch.randn(z0.shape, generator=gen, device=args.device)
        noise = noise + 0.1 * torch.randn((args.batch, z0.shape[1], 1, 1), generator=gen, device=args.device)
        a = abar[t][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        context = clip(tokenizer(captions).to(args.device)).last_hidden_state
        loss = F.mse_loss(unet(zt, t, context), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - args.ema)
        log("diffusion", step, args.steps, loss.item())
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return unet.eval(), clip.eval()


def save_checkpoint(path: Path, unet: UNet, vae: AutoencoderKL, clip: CLIPTextModel):
    """The official single-file layout of an SD 1.5 checkpoint, in float16, naming its preset."""
    write_single_file(path, unet, vae, [clip], dtype=torch.float16, metadata={PRESET_KEY: PRESET_NAME})


def plot_losses(losses: dict[str, list[float]], path: Path, smooth: int = 25):
    """A small line chart (log scale) of each phase's loss, moving-averaged over `smooth` steps."""
    panels = list(losses.items())
    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for n, (phase, values) in enumerate(panels):
        v = np.convolve(values, np.ones(smooth) / smooth, mode="valid") if len(values) > smooth else np.array(values)
        lv = np.log10(v)
        lo, hi = lv.min(), lv.max()
        x0 = n * w
        pts = [(x0 + pad + i * (w - 2 * pad) / max(1, len(lv) - 1), h - pad - (y - lo) / max(hi - lo, 1e-9)
                * (h - 2 * pad)) for i, y in enumerate(lv)]
        draw.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="gray")
        draw.line(pts, fill=(40, 80, 220), width=2)
        draw.text((x0 + pad, 12), f"{phase} loss (log scale), {len(values)} steps", fill="black")
        draw.text((x0 + 4, pad - 6), f"{10 ** hi:.3g}", fill="black")
        draw.text((x0 + 4, h - pad - 6), f"{10 ** lo:.3g}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log, start = Log(), time.time()
    print(f"rendering {args.images} pictures", flush=True)
    images, _, scenes = shapes.sample(args.seed, args.images)
    vae = train_vae(images, args, log)
    check_autoencoder(vae, args)
    a = rescale_latents(vae, images, args.device)
    latents = latent_means(vae, images, args.device) * VAE_SD15.scaling_factor  # computed once
    print(f"latent space scaled by {a:.3f}; scaled latents: std {latents.std():.3f}", flush=True)
    unet, clip = train_diffusion(latents, scenes, args, log)
    save_checkpoint(args.out, unet, vae, clip)
    minutes = (time.time() - start) / 60
    args.log_dir.mkdir(parents=True, exist_ok=True)
    (args.log_dir / "train_log.json").write_text(json.dumps(
        {"minutes": round(minutes, 1), "threads": torch.get_num_threads(), "device": args.device,
         "args": {k: str(v) for k, v in vars(args).items()}, "losses": log.losses}))
    plot_losses(log.losses, args.log_dir / "loss.png")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {minutes:.1f} min", flush=True)


if __name__ == "__main__":
    main()
