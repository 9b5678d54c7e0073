"""CLIP byte-level BPE tokenizer, built on the `tokenizers` library.

The vocabulary (sd/assets/vocab.json, merges.txt) is OpenAI CLIP's, MIT
licensed (see sd/assets/LICENSE-CLIP). The rules mirror transformers'
`CLIPTokenizer`: NFC, whitespace runs collapsed to one space, lower-case,
CLIP's word regex, byte-level BPE with an end-of-word suffix.
"""

from functools import cache
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer as _Backend, normalizers, pre_tokenizers
from tokenizers.models import BPE

ASSETS = Path(__file__).parent / "assets"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77


class Tokenizer:
    """Text -> (B, 77) token ids: start token, up to 75 BPE tokens, end token, padding.

    `pad_token` is "<|endoftext|>" for CLIP-L (SD 1.5, SDXL's first encoder)
    and "!" (id 0) for OpenCLIP bigG (SDXL's second encoder).
    """

    def __init__(self, vocab_dir: str | Path = ASSETS, pad_token: str = EOS, length: int = CONTEXT_LENGTH):
        backend = _Backend(bpe_model(Path(vocab_dir).resolve()))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # CLIP's word pattern: contractions, letter runs, single digits, punctuation runs.
        words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # Written in a prompt, special tokens stay one token each. transformers (so diffusers' SDXL
        # tokenizer_2) registers the "!" padding as one too: a "!" in the prompt becomes id 0.
        backend.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))
        self._backend = backend
        self.bos_id, self.eos_id = backend.token_to_id(BOS), backend.token_to_id(EOS)
        self.pad_id = backend.token_to_id(pad_token)
        self.length = length

    def encode_ids(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens or truncation."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.bos_id] + self.encode_ids(text)[: self.length - 2] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, 77)


@cache
def bpe_model(vocab_dir: Path) -> BPE:
    """The BPE model of a vocabulary folder, read once per process: reading it is a third of
    loading SD 1.5, and SDXL's two tokenizers, like all the models a server holds, share
    CLIP's vocabulary. Read by the tokenizers library itself (Rust): three times faster than
    json + Python lists."""
    return BPE.from_file(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                         continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS)
