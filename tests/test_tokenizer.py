"""sd.tokenizer.Tokenizer vs transformers' CLIPTokenizer built from the same vocab files.

transformers is loaded with `from_pretrained(<dir>)`: in transformers 5 `CLIPTokenizer(vocab_file=...)`
silently builds an empty vocabulary.
"""

import unicodedata
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

import sd.tokenizer
from sd.tokenizer import Tokenizer, bpe_model

ASSETS = Path(sd.tokenizer.__file__).parent / "assets"
BOS, EOS, BANG = 49406, 49407, 0

CAFE_NFC = unicodedata.normalize("NFC", "café crème brûlée, naïve façade")
CAFE_NFD = unicodedata.normalize("NFD", CAFE_NFC)
assert CAFE_NFC != CAFE_NFD

LONG_WORDS = " ".join(["a photo of an astronaut riding a horse on mars"] * 12)  # ~120 tokens
LONG_BPE = " ".join(["supercalifragilisticexpialidocious antidisestablishmentarianism"] * 8)
LONG_EMOJI = "🐱" * 100  # several BPE tokens per emoji

# No "!" in this corpus: the "!"-padded tokenizer treats it specially (test_bang_in_prompt_* below).
CORPUS = [
    "a photo of a cat",
    "",
    " ",
    "   leading and trailing spaces   ",
    "repeated    spaces\tand\ttabs\nand\n\nnewlines\r\n and \u00a0nbsp \u2003em-space",
    "UPPER Case MiXeD and ÀÉÎÕÜ",
    CAFE_NFC,
    CAFE_NFD,
    "e\u0301 a\u0300 n\u0303 o\u0308 (combining marks)",
    "Ǆ ǅ ǆ İstanbul STRASSE straße ΣΑΣ ὈΔΥΣΣΕΎΣ",
    "ﬁ ﬂ ligatures, Ｆｕｌｌ ｗｉｄｔｈ, ①②③ ½ ² ㎏",
    "日本語のテキスト 中文提示词 한국어 프롬프트",
    "emoji 🐱🐶🦄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "zero\u200bwidth\u200cjoiners\u200d and \ufeff bom",
    "punctuation... ,,, ;;; ??? --- ((((masterpiece)))) [[best quality]] {a|b} <tag> @#$%^&*_+=~`",
    "quotes \"double\" 'single' «guillemets» „low“ ’curly’",
    "numbers 1234567890 3.14159 -42 1,000,000 1e-5 0x1F 4k 8K 1920x1080",
    "contractions: don't can't it's we're they've I'm you'll he'd DON'T IT'S",
    "hello <|endoftext|> world",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|> twice",
    "x<|endoftext|>y and <|startoftext|> inside",
    "&amp; &lt;b&gt; html entities stay literal",
    "a\\nliteral backslash-n and C:\\path\\to\\file",
    "mixed: Café 東京 🍣 don't 42?",
    "word " * 74 + "end",   # 75 tokens: fills the context exactly
    "word " * 75 + "end",   # 76 tokens: one over
    LONG_WORDS,
    LONG_BPE,
    LONG_EMOJI,
    "a " * 80 + "<|endoftext|> tail",  # literal end token beyond the truncation point
]


@pytest.fixture(scope="module")
def hf():
    return CLIPTokenizer.from_pretrained(str(ASSETS))


@pytest.fixture(scope="module")
def hf_bang():
    return CLIPTokenizer.from_pretrained(str(ASSETS), pad_token="!")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def tok_bang():
    return Tokenizer(pad_token="!")


def hf_ids(tok, texts):
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_reference_tokenizer_is_real(hf, hf_bang):
    # Guard against a silently empty vocabulary on the reference side.
    assert len(hf) == 49408
    assert hf.bos_token_id == BOS and hf.eos_token_id == EOS and hf.pad_token_id == EOS
    assert hf_bang.pad_token_id == BANG
    assert hf_ids(hf, ["a photo of a cat"])[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]


@pytest.mark.parametrize("text", CORPUS, ids=[f"p{i}" for i in range(len(CORPUS))])
def test_ids_match_transformers(tok, hf, text):
    ours = tok([text])
    ref = hf_ids(hf, [text])
    assert ours.dtype == torch.long and ours.shape == (1, 77)
    assert torch.equal(ours, ref), f"{text!r}\nours {ours[0].tolist()}\nref  {ref[0].tolist()}"


def test_batch_matches_transformers(tok, hf):
    ours = tok(CORPUS)
    ref = hf_ids(hf, CORPUS)
    assert ours.shape == (len(CORPUS), 77)
    assert torch.equal(ours, ref)


def test_string_input_is_a_batch_of_one(hf):
    assert torch.equal(Tokenizer()("a photo of a cat"), hf_ids(hf, ["a photo of a cat"]))


@pytest.mark.parametrize("text", [LONG_WORDS, LONG_BPE, LONG_EMOJI, "word " * 75 + "end"])
def test_truncation_keeps_end_token(tok, hf, text):
    ours = tok([text])[0]
    assert ours[0].item() == BOS and ours[76].item() == EOS
    assert (ours[1:76] != EOS).all()  # 75 content tokens, no padding
    assert torch.equal(ours, hf_ids(hf, [text])[0])


def test_nfc_and_nfd_agree(tok):
    assert torch.equal(tok([CAFE_NFC]), tok([CAFE_NFD]))


def test_case_and_whitespace_are_normalised(tok):
    assert torch.equal(tok(["A  Photo\tOF\n\na CAT"]), tok(["a photo of a cat"]))


def test_literal_end_token_is_one_token(tok):
    ids = tok(["hello <|endoftext|> world"])[0].tolist()
    assert ids[:5] == [BOS, 3306, EOS, 1002, EOS]


@pytest.mark.parametrize("text", CORPUS, ids=[f"p{i}" for i in range(len(CORPUS))])
def test_bang_padding_matches_transformers(tok_bang, hf_bang, text):
    ours = tok_bang([text])
    ref = hf_ids(hf_bang, [text])
    assert torch.equal(ours, ref), f"{text!r}\nours {ours[0].tolist()}\nref  {ref[0].tolist()}"


def test_bang_padding_batch(tok_bang, hf, hf_bang):
    ours = tok_bang(CORPUS)
    assert torch.equal(ours, hf_ids(hf_bang, CORPUS))
    # Same ids as the CLIP-L tokenizer except the padding, which is a suffix: 49407 there, 0 here.
    clip_l = hf_ids(hf, CORPUS)
    lengths = [min(len(hf(t, add_special_tokens=False).input_ids), 75) + 2 for t in CORPUS]
    padding = torch.arange(77)[None] >= torch.tensor(lengths)[:, None]
    assert torch.equal(ours[~padding], clip_l[~padding])
    assert (ours[padding] == BANG).all() and (clip_l[padding] == EOS).all()
    assert padding.any() and not padding.all()


BANG_PROMPTS = ["wow!!! amazing!", "hello!", "!", "?!?!", "a cat! a dog!!"]


@pytest.mark.parametrize("text", BANG_PROMPTS)
def test_bang_in_prompt_matches_transformers_bang_tokenizer(tok_bang, hf_bang, text):
    """transformers' CLIPTokenizer(pad_token='!'), which is diffusers' SDXL tokenizer_2, registers
    '!' as a special token: 'hello!' -> [..., 3306, 0, 49407], where OpenCLIP would write 256
    ('!</w>'). sd follows diffusers, so SDXL images match for such prompts too."""
    assert torch.equal(tok_bang([text]), hf_ids(hf_bang, [text]))


def test_tokenizers_of_one_vocabulary_share_one_reading_of_it_but_not_their_padding():
    bpe_model.cache_clear()
    clip_l, big_g = Tokenizer(), Tokenizer(pad_token="!")  # SDXL's pair
    assert (bpe_model.cache_info().misses, bpe_model.cache_info().hits) == (1, 1)
    # "!" is a special token (id 0) for bigG only: sharing the BPE model must not leak it.
    assert clip_l("wow!")[0, 2].item() == 256 and big_g("wow!")[0, 2].item() == 0
