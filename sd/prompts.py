"""Prompts -> the text conditioning the UNet attends to.

SD 1.5 conditions on CLIP-L's last hidden state after the final layer norm, (B, 77, 768).
SDXL on the penultimate hidden states of CLIP-L and OpenCLIP bigG side by side (no final
norm), (B, 77, 2048), plus bigG's projected pooled output, (B, 1280).

Two styles, as people write prompts:
- "plain" (default): diffusers' encoding. One 77-token window (start, 75 prompt tokens, end,
  padding); tokens past the 75th are dropped and counted in `PromptEmbeddings.dropped`.
- "weighted": AUTOMATIC1111's web UI. `(word)` x1.1, `[word]` /1.1, `(word:1.3)`, nesting,
  `\\(` escapes, and `BREAK` to start a new chunk; prompts of any length, in windows of up to 75
  tokens each encoded on its own and concatenated along the sequence (T = 77 x chunks).

clip_skip=N is diffusers' meaning: the hidden state N layers before the one the model usually
reads (SD 1.5: hidden_states[-(N + 1)] then the final norm; SDXL: hidden_states[-(N + 2)], no
norm; SDXL's pooled output is never skipped), and the pipeline applies it to the prompt only, as
diffusers does. A1111's "Clip skip" counts from 1 (its 2 is N=1) and applies to the negative
prompt too.
"""

import re
from dataclasses import dataclass, field

import torch

from .errors import InputError

STYLES = ("plain", "weighted")
CHUNK = 75              # prompt tokens per window: 77 minus the start and end tokens
COMMA_BACKTRACK = 20    # A1111's default "comma_padding_backtrack"
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (text) and [text]
BREAK = None            # the weight of the run that ends a chunk


@dataclass
class PromptEmbeddings:
    context: torch.Tensor               # (B, T, C): what cross-attention reads
    pooled: torch.Tensor | None         # (B, P): SDXL's pooled text embedding
    # Per prompt: tokens past the 75 a plain prompt's window holds, not used (style="weighted" keeps them).
    dropped: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- parser

_SYNTAX = re.compile(r"""
    \\(?P<literal>[\\()\[\]]?)                          # \( \) \[ \] \\ are the character; a lone \ is nothing
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)      # "(text:1.3)": a weight closes a round bracket
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(prompt: str) -> list[tuple[str, float | None]]:
    """A1111's emphasis syntax (modules/prompt_parser.py, parse_prompt_attention) -> (text, weight)
    runs, neighbours of equal weight merged; ("BREAK", None) ends a chunk.

    A closing bracket multiplies everything since its opening one; brackets never closed apply
    at the end (round ones first). A bracket or weight with nothing to close is text. Unlike
    A1111, BREAK inside brackets still breaks (there it became the word "BREAK", weighted -1.1),
    and a weight that is no number ("(a:1.2.3)", where A1111 fails) is text."""
    runs: list[list] = []                         # [text, weight]
    opened = {"(": [], "[": []}                   # bracket -> the runs it started at, innermost last

    def scale(start: int, factor: float):
        for run in runs[start:]:
            if run[1] is not BREAK:
                run[1] *= factor

    for m in _SYNTAX.finditer(prompt):
        kind, token = m.lastgroup, m[0]
        if kind == "literal":
            runs.append([m["literal"], 1.0])
        elif kind == "open":
            opened[token].append(len(runs))
        elif kind == "weight" and opened["("]:
            scale(opened["("].pop(), float(m["weight"]))
        elif kind == "close" and opened["(" if token == ")" else "["]:
            scale(opened["(" if token == ")" else "["].pop(), ROUND if token == ")" else SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(["BREAK", BREAK])
                runs.append([part, 1.0])
    for bracket, factor in (("(", ROUND), ("[", SQUARE)):
        for start in opened[bracket]:
            scale(start, factor)
    merged = []
    for text, weight in runs or [["", 1.0]]:
        if merged and weight is not BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


# ---------------------------------------------------------------- chunker

def chunk(runs: list[tuple[str, float | None]], tokenizer) -> list[tuple[list[int], list[float]]]:
    """(text, weight) runs -> windows of at most 75 (token ids, weights), as A1111 cuts them
    (modules/sd_hijack_clip.py, tokenize_line): each run tokenized on its own; a full window
    followed by a token other than a comma, whose last comma is among its last 20 tokens, ends
    after that comma and the rest moves on to the next; BREAK ends the window it is in."""
    comma_id = tokenizer.encode_ids(",")[0]
    windows, ids, weights, comma = [], [], [], -1
    for text, weight in runs:
        if weight is BREAK:
            windows.append((ids, weights))
            ids, weights, comma = [], [], -1
            continue
        for token in tokenizer.encode_ids(text):
            if len(ids) == CHUNK:
                backtrack = token != comma_id and comma >= 0 and CHUNK - comma <= COMMA_BACKTRACK
                cut = comma + 1 if backtrack else CHUNK
                windows.append((ids[:cut], weights[:cut]))
                ids, weights, comma = ids[cut:], weights[cut:], -1
            if token == comma_id:
                comma = len(ids)
            ids.append(token)
            weights.append(weight)
    if ids or not windows:
        windows.append((ids, weights))
    return windows


# ---------------------------------------------------------------- encoder

def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis (modules/sd_emphasis.py): each token's output (N, 77, C) scaled by
    its weight (N, 77), then each window rescaled to keep its mean. A1111 takes the mean over the
    batch of one call (usually one prompt); per window keeps each image independent of the batch."""
    scaled = z * weights[..., None]
    return scaled * (z.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))


def encode(encoders, tokenizers, sdxl: bool, prompts: list[str], *, style: str = "plain",
           clip_skip: int | None | list[int | None] = None) -> PromptEmbeddings:
    """Encode a batch of prompts with each text encoder and combine as the family does.
    `clip_skip`: one for every prompt, or one per prompt (the pipeline skips none for negative
    prompts, as diffusers). Every prompt comes back with the same T: shorter ones are padded with
    empty windows (the encoding of ""), as A1111 pads a batch and its negative prompt."""
    if style not in STYLES:
        raise InputError(f"prompt_style: {style!r} is not one of {', '.join(STYLES)}")
    skips = list(clip_skip) if isinstance(clip_skip, (list, tuple)) else [clip_skip] * len(prompts)
    if len(skips) != len(prompts):
        raise InputError(f"clip_skip: one for all prompts or one per prompt ({len(prompts)}), got {len(skips)}")
    most = min(enc.cfg.layers for enc in encoders) - (1 if sdxl else 0)  # SDXL starts one layer back
    for skip in skips:
        if skip is not None and not 0 <= skip <= most:
            raise InputError(f"clip_skip: must be a whole number from 0 to {most} for this model, got {skip}")
    if style == "plain":  # one window, weights None: no emphasis at all
        tokens = [[tok.encode_ids(p) for p in prompts] for tok in tokenizers]
        windowed = [[[(ids[:CHUNK], None)] for ids in per_prompt] for per_prompt in tokens]
        dropped = [max(0, max(len(per_prompt[k]) for per_prompt in tokens) - CHUNK) for k in range(len(prompts))]
    else:
        runs = [parse(p) for p in prompts]
        windowed = [[chunk(r, tok) for r in runs] for tok in tokenizers]
        dropped = [0] * len(prompts)
    n = max(len(w) for per_prompt in windowed for w in per_prompt)
    contexts, pooled = [], None
    for enc, tok, per_prompt in zip(encoders, tokenizers, windowed):
        windows = [w for ws in per_prompt for w in ws + [([], None)] * (n - len(ws))]
        ids = torch.tensor([[tok.bos_id, *i, tok.eos_id] + [tok.pad_id] * (CHUNK - len(i)) for i, _ in windows])
        out = enc(ids.to(enc.embeddings.token_embedding.weight.device))
        z = _layer(enc, out, sdxl, [s for s in skips for _ in range(n)])
        if style == "weighted":  # start, end and padding tokens weigh 1
            weights = torch.tensor([[1.0, *(w or [])] + [1.0] * (CHUNK + 1 - len(w or [])) for _, w in windows])
            z = emphasize(z.float(), weights.to(z.device)).to(z.dtype)
        contexts.append(z.reshape(len(prompts), n * z.shape[1], z.shape[2]))
        pooled = out.pooled.reshape(len(prompts), n, -1)[:, 0]  # SDXL: bigG's, from the first window
    context = torch.cat(contexts, dim=-1) if sdxl else contexts[0]
    return PromptEmbeddings(context, pooled if sdxl else None, dropped)


def _layer(encoder, out, sdxl: bool, skips: list[int | None]) -> torch.Tensor:
    """The hidden state each window's row reads, clip skip applied (diffusers' encode_prompt)."""
    def hidden(skip):
        if sdxl:
            return out.hidden_states[-(skip or 0) - 2]
        return out.last_hidden_state if not skip else encoder.final_layer_norm(out.hidden_states[-skip - 1])
    picked = {skip: hidden(skip) for skip in set(skips)}
    if len(picked) == 1:
        return picked[skips[0]]
    return torch.stack([picked[skip][row] for row, skip in enumerate(skips)])
