"""CLIP text transformer (Radford et al. 2021), module names as Hugging Face's `CLIPTextModel`.

SD 1.5 conditions on CLIP ViT-L/14's last hidden state after the final layer
norm; SDXL on the penultimate hidden states (no final norm) of CLIP-L and
OpenCLIP bigG, plus bigG's projected pooled output.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    act: str = "quick_gelu"          # CLIP-L: quick_gelu; OpenCLIP bigG: gelu
    eps: float = 1e-5
    projection_dim: int | None = None  # bigG projects its pooled output (1280 -> 1280)
    eos_id: int = 49407


CLIP_L = CLIPConfig()
CLIP_BIG_G = CLIPConfig(width=1280, layers=32, heads=20, mlp_width=5120, act="gelu", projection_dim=1280)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


@dataclass
class TextOutput:
    last_hidden_state: torch.Tensor   # (B, T, C) after the final layer norm
    hidden_states: list[torch.Tensor]  # embeddings, then each layer's output (no final norm)
    pooled: torch.Tensor              # (B, C) or (B, projection_dim): end-token state, projected if configured


class CLIPTextModel(nn.Module):
    """The `text_model.*` part of a CLIP checkpoint (plus `text_projection` for bigG)."""

    def __init__(self, cfg: CLIPConfig = CLIP_L):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> TextOutput:
        x = self.embeddings(ids)  # (B, T, C)
        T = ids.shape[1]
        causal = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x, causal)
            hidden.append(x)
        last = self.final_layer_norm(x)
        end = (ids == self.cfg.eos_id).int().argmax(dim=-1)  # first end-of-text token
        pooled = last[torch.arange(len(ids), device=ids.device), end]
        if self.cfg.projection_dim:
            pooled = self.text_projection(pooled)
        return TextOutput(last, hidden, pooled)
