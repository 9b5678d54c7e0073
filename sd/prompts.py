"""Prompts -> the text conditioning the UNet attends to.

SD 1.5 conditions on CLIP-L's last hidden state after the final layer norm, (B, 77, 768).
SDXL on the penultimate hidden states of CLIP-L and OpenCLIP bigG side by side (no final
norm), (B, 77, 2048), plus bigG's projected pooled output, (B, 1280).
"""

from dataclasses import dataclass, field

import torch

STYLES = ("plain",)


@dataclass
class PromptEmbeddings:
    context: torch.Tensor               # (B, T, C): what cross-attention reads
    pooled: torch.Tensor | None         # (B, P): SDXL's pooled text embedding
    dropped: list[int] = field(default_factory=list)  # per prompt: tokens past the encoder's window, not used


def encode(encoders, tokenizers, sdxl: bool, prompts: list[str], *, style: str = "plain",
           clip_skip: int | None = None) -> PromptEmbeddings:
    """Encode a batch of prompts with each text encoder and combine as the family does."""
    if clip_skip is not None:
        raise ValueError("clip_skip: not supported yet")
    outs = [enc(tok(prompts).to(enc.embeddings.token_embedding.weight.device))
            for enc, tok in zip(encoders, tokenizers)]
    if not sdxl:
        return PromptEmbeddings(outs[0].last_hidden_state, None)
    return PromptEmbeddings(torch.cat([o.hidden_states[-2] for o in outs], dim=-1), outs[-1].pooled)
