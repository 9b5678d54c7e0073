"""sd.prompts: A1111's prompt syntax, long prompts and clip skip, against their references.

- parse(): AUTOMATIC1111's own documented examples, written here as the spec: the doctests of
  `parse_prompt_attention` in its modules/prompt_parser.py, and the wiki's "Features" page
  ("Attention/emphasis" cheat sheet; "Infinite prompt length" and BREAK).
- chunk(): A1111's cutting rule (modules/sd_hijack_clip.py, tokenize_line; comma_padding_backtrack
  20, its default), on prompts whose token counts are worked out by hand.
- encode(): tiny random-weight transformers CLIP models (CLIP-L-shaped; for SDXL also a bigG-shaped
  one with a projection), their weights copied into ours. References computed in the same run:
  compel (`truncate_long_prompts=False`, the package diffusers' docs point to for long prompts) for
  unweighted long prompts; transformers' CLIP run on each chunk, weighted by A1111's formula, for
  weighted prompts; hidden states as diffusers' encode_prompt picks them for clip skip.

Tolerance: fp32 on both sides, max |ours - ref| <= 1e-4 * max |ref| (helpers.assert_close_scaled);
a weight of 1 must give exactly the plain prompt's embeddings. Broken variants (no comma backtrack,
no mean restore) are shown to fail. Run with `pytest -s` to see the measured differences.
"""

from types import SimpleNamespace

import pytest
import torch
from compel import CompelForSD, CompelForSDXL
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from transformers import CLIPTextModel as HFCLIPTextModel

from helpers import NEGATIVE, SD15_LONG, SDXL_LONG, assert_close_scaled, randomize_params
from sd import prompts
from sd.clip import CLIPConfig, CLIPTextModel
from sd.errors import InputError
from sd.prompts import BREAK, chunk, encode, parse
from sd.tokenizer import ASSETS, Tokenizer

REL = 1e-4


# ---------------------------------------------------------------- parser: A1111's documented examples

# The doctests of parse_prompt_attention (AUTOMATIC1111/stable-diffusion-webui, modules/prompt_parser.py).
A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

# The wiki's "Attention/emphasis" cheat sheet: (word) x1.1, ((word)) x1.21, [word] /1.1, (word:1.5),
# (word:0.25), \( \) for literal brackets, e.g. anime_\(character\).
WIKI_CHEAT_SHEET = [
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.21)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("anime_\\(character\\)", [("anime_(character)", 1.0)]),
]

# The same grammar's further rules (prompt_parser.py's tokens): spaces around a weight, a weight only
# closes a round bracket, a backslash before anything else vanishes, BREAK is upper case only.
GRAMMAR = [
    ("(word: 1.3 )", [("word", 1.3)]),
    ("[word:1.3]", [("word:1.3", 1 / 1.1)]),
    ("a) b] c:1.2)", [("a) b] c:1.2)", 1.0)]),
    ("\\\\ a\\b", [("\\ ab", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", BREAK), ("a dog", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_DOCTESTS + WIKI_CHEAT_SHEET + GRAMMAR,
                         ids=[p for p, _ in A1111_DOCTESTS + WIKI_CHEAT_SHEET + GRAMMAR])
def test_parse_matches_a1111s_documented_examples(prompt, expected):
    got = parse(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == [pytest.approx(w, rel=1e-12) if w is not BREAK else None for _, w in expected]


def test_break_inside_brackets_still_breaks():
    """A deliberate difference: in A1111 a BREAK inside brackets becomes the word "BREAK" weighted -1.1."""
    assert parse("(a BREAK b)") == [("a", 1.1), ("BREAK", BREAK), ("b", 1.1)]


# ---------------------------------------------------------------- chunker: A1111's cutting rule

def lengths(prompt: str) -> list[int]:
    return [len(ids) for ids, _ in chunk(parse(prompt), Tokenizer())]


def test_one_token_words():
    """The prompts below count tokens by words: each of these words and ", " is one token."""
    tok = Tokenizer()
    assert len(tok.encode_ids("cat " * 30 + ", " * 5 + "dog " * 20)) == 55


@pytest.mark.parametrize("prompt, expected", [
    # The wiki: "a prompt with 120 tokens would be separated into two chunks: first with 75 tokens, second with 45".
    ("cat " * 120, [75, 45]),
    ("cat " * 75, [75]),
    ("", [0]),
    # Comma at token 61 of a full window (within its last 20): the window ends after it.
    ("cat " * 60 + ", " + "dog " * 30, [61, 30]),
    # Comma at token 56 (the last 20 are 56..75): still moved.
    ("cat " * 55 + ", " + "dog " * 30, [56, 30]),
    # Comma at token 55 is 21 from the end: no backtrack.
    ("cat " * 54 + ", " + "dog " * 30, [75, 10]),
    # The window is full and the next token is itself a comma: no backtrack, the comma starts the next.
    ("cat " * 60 + ", " + "dog " * 14 + ", " + "dog " * 5, [75, 6]),
    # Exactly full and nothing follows: nothing moves.
    ("cat " * 60 + ", " + "dog " * 14, [75]),
    # BREAK: "fills the current chunk with padding ... more text after BREAK will start a new chunk".
    ("cat BREAK dog", [1, 1]),
    ("cat " * 75 + "BREAK dog", [75, 1]),
    ("BREAK cat", [0, 1]),
    ("cat BREAK", [1]),
])
def test_chunk_lengths(prompt, expected):
    assert lengths(prompt) == expected


def test_weights_move_with_their_tokens():
    windows = chunk(parse("cat " * 60 + ", " + "(dog:1.3) " * 30), Tokenizer())
    assert [w for _, w in windows] == [[1.0] * 61, [1.3] * 30]


# ---------------------------------------------------------------- encoders

def hf_config(layers: int, act: str, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=64, intermediate_size=37, num_attention_heads=1, num_hidden_layers=layers,
                          vocab_size=49408, max_position_embeddings=77, hidden_act=act, **kw)


def ours_from(hf, projection: bool = False) -> CLIPTextModel:
    cfg = hf.config
    ours = CLIPTextModel(CLIPConfig(width=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                                    mlp_width=cfg.intermediate_size, act=cfg.hidden_act,
                                    projection_dim=cfg.projection_dim if projection else None))
    state = {k.removeprefix("text_model."): v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state)
    return ours.eval()


@pytest.fixture(scope="module")
def sd15():
    hf = randomize_params(HFCLIPTextModel(hf_config(3, "quick_gelu")).eval(), seed=1)
    hf_tok = CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77)
    return SimpleNamespace(sdxl=False, ours=[ours_from(hf)], tokenizers=[Tokenizer()], hf=[hf], hf_tokenizers=[hf_tok],
                           pipe=SimpleNamespace(tokenizer=hf_tok, text_encoder=hf))


@pytest.fixture(scope="module")
def sdxl():
    hf1 = randomize_params(HFCLIPTextModel(hf_config(3, "quick_gelu")).eval(), seed=2)
    hf2 = randomize_params(CLIPTextModelWithProjection(hf_config(4, "gelu", projection_dim=64)).eval(), seed=3)
    tok1 = CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77)
    tok2 = CLIPTokenizer.from_pretrained(str(ASSETS), model_max_length=77, pad_token="!")
    return SimpleNamespace(sdxl=True, ours=[ours_from(hf1), ours_from(hf2, projection=True)],
                           tokenizers=[Tokenizer(), Tokenizer(pad_token="!")], hf=[hf1, hf2],
                           hf_tokenizers=[tok1, tok2],
                           pipe=SimpleNamespace(tokenizer=tok1, text_encoder=hf1, tokenizer_2=tok2, text_encoder_2=hf2))


@pytest.fixture(params=["sd15", "sdxl"])
def models(request):
    return request.getfixturevalue(request.param)


@torch.no_grad()
def ours(m, texts, **kw) -> prompts.PromptEmbeddings:
    return encode(m.ours, m.tokenizers, m.sdxl, texts, **kw)


# ---------------------------------------------------------------- weighted == plain at weight 1

@pytest.mark.parametrize("clip_skip", [None, 1])
def test_weight_one_is_exactly_the_plain_prompt(models, clip_skip):
    plain = ours(models, ["a photo of a cat", "a dog"], clip_skip=clip_skip)
    weighted = ours(models, ["(a photo of a cat:1.0)", "a (dog:1)"], style="weighted", clip_skip=clip_skip)
    assert torch.equal(weighted.context, plain.context)
    assert (weighted.pooled is None and plain.pooled is None) or torch.equal(weighted.pooled, plain.pooled)


# ---------------------------------------------------------------- long prompts vs compel

def compel_reference(m, prompt, negative):
    """compel (truncate_long_prompts=False): each chunk through transformers' CLIP, the negative padded
    with the encoding of "" to the same length."""
    if m.sdxl:
        c = CompelForSDXL(m.pipe)(prompt, negative_prompt=negative)
        return torch.cat([c.embeds, c.negative_embeds]), torch.cat([c.pooled_embeds, c.negative_pooled_embeds])
    c = CompelForSD(m.pipe)(prompt, negative_prompt=negative)
    return torch.cat([c.embeds, c.negative_embeds]), None


def assert_long_prompt_matches_compel(m, name):
    prompt = SDXL_LONG if m.sdxl else SD15_LONG
    got = ours(m, [prompt, NEGATIVE], style="weighted")
    with torch.no_grad():
        context, pooled = compel_reference(m, prompt, NEGATIVE)
    assert_close_scaled(got.context, context, REL, name)
    if m.sdxl:
        assert_close_scaled(got.pooled, pooled, REL, name + "/pooled")
    return got


def test_long_prompt_matches_compel(models):
    got = assert_long_prompt_matches_compel(models, f"long prompt/{'sdxl' if models.sdxl else 'sd15'}")
    assert got.context.shape[1] == 77 * (3 if models.sdxl else 2) and got.dropped == [0, 0]


def test_long_prompt_without_comma_backtrack_differs_from_compel(models, monkeypatch):
    """The broken variant: plain 75-token slicing. Same number of windows here, different contents."""
    monkeypatch.setattr(prompts, "COMMA_BACKTRACK", 0)
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        assert_long_prompt_matches_compel(models, "long prompt without backtrack (must fail)")


# ---------------------------------------------------------------- weighted chunks vs transformers

# "a photo of a (red:1.3) cat, [[blurry]] BREAK (in the snow:0.8), \(sunset\)" cut by hand: A1111's
# fragments (each tokenized on its own) and their weights, one list per chunk.
WEIGHTED = "a photo of a (red:1.3) cat, [[blurry]] BREAK (in the snow:0.8), \\(sunset\\)"
WEIGHTED_CHUNKS = [[("a photo of a ", 1.0), ("red", 1.3), (" cat, ", 1.0), ("blurry", 1 / 1.1 / 1.1)],
                   [("in the snow", 0.8), (", (sunset)", 1.0)]]


def hf_chunk(tok, fragments) -> tuple[list[int], list[float]]:
    ids, weights = [tok.bos_token_id], [1.0]
    for text, weight in fragments:
        piece = tok(text, add_special_tokens=False).input_ids
        ids, weights = ids + piece, weights + [weight] * len(piece)
    ids.append(tok.eos_token_id)
    return ids + [tok.pad_token_id] * (77 - len(ids)), weights + [1.0] * (77 - len(weights))


def a1111_emphasis(z, weights):
    """modules/sd_emphasis.py, "Original": z * weights, then rescaled to z's mean."""
    scaled = z * torch.tensor(weights)[:, None]
    return scaled * (z.mean() / scaled.mean())


@torch.no_grad()
def transformers_reference(m, chunks, clip_skip):
    contexts, pooled = [], None
    for hf, tok in zip(m.hf, m.hf_tokenizers):
        zs = []
        for fragments in chunks:
            ids, weights = hf_chunk(tok, fragments)
            out = hf(torch.tensor([ids]), output_hidden_states=True)
            if m.sdxl:
                z = out.hidden_states[-((clip_skip or 0) + 2)]
            else:
                z = hf.final_layer_norm(out.hidden_states[-(clip_skip + 1)]) if clip_skip else out.last_hidden_state
            zs.append(a1111_emphasis(z[0], weights))
            if pooled is None and hasattr(out, "text_embeds"):
                pooled = out.text_embeds  # SDXL: bigG's, from the first chunk, unweighted
        contexts.append(torch.cat(zs))
    return torch.cat(contexts, dim=-1)[None], pooled


def assert_weighted_matches_transformers(m, clip_skip, name):
    got = ours(m, [WEIGHTED], style="weighted", clip_skip=clip_skip)
    context, pooled = transformers_reference(m, WEIGHTED_CHUNKS, clip_skip)
    assert_close_scaled(got.context, context, REL, name)
    if m.sdxl:
        assert_close_scaled(got.pooled, pooled, REL, name + "/pooled")


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_weighted_chunks_match_transformers(models, clip_skip):
    name = f"weighted/{'sdxl' if models.sdxl else 'sd15'}/skip{clip_skip}"
    assert_weighted_matches_transformers(models, clip_skip, name)


def test_weighted_without_mean_restore_differs(models, monkeypatch):
    monkeypatch.setattr(prompts, "emphasize", lambda z, w: z * w[..., None])
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        assert_weighted_matches_transformers(models, None, "weighted without mean restore (must fail)")


def test_negative_prompt_padded_with_empty_windows(models):
    """Shorter prompts of a batch get windows that are the encoding of "" (what A1111 and compel pad with)."""
    got = ours(models, [WEIGHTED, "a dog", ""], style="weighted")
    empty = ours(models, [""], style="weighted").context[0]
    assert got.context.shape[1] == 2 * 77
    assert torch.equal(got.context[1, 77:], empty) and torch.equal(got.context[2, 77:], empty)
    assert torch.equal(got.context[2, :77], empty)


# ---------------------------------------------------------------- clip skip, plain prompts

@torch.no_grad()
def diffusers_reference(m, texts, clip_skips):
    """diffusers' encode_prompt: one 77-token window, truncated; clip skip picks SD 1.5's
    hidden_states[-(clip_skip + 1)] then the final layer norm, SDXL's hidden_states[-(clip_skip + 2)]."""
    contexts = []
    for hf, tok in zip(m.hf, m.hf_tokenizers):
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = hf(ids, output_hidden_states=True)
        rows = []
        for row, skip in enumerate(clip_skips):
            if m.sdxl:
                rows.append(out.hidden_states[-((skip or 0) + 2)][row])
            else:
                rows.append(hf.final_layer_norm(out.hidden_states[-(skip + 1)][row]) if skip
                            else out.last_hidden_state[row])
        contexts.append(torch.stack(rows))
    return torch.cat(contexts, dim=-1)


@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_clip_skip_picks_diffusers_hidden_state(models, clip_skip):
    texts = ["a photo of a cat", NEGATIVE]
    got = ours(models, texts, clip_skip=[clip_skip, None])  # as the pipeline asks: none for the negative
    name = f"clip skip {clip_skip}/{'sdxl' if models.sdxl else 'sd15'}"
    assert_close_scaled(got.context, diffusers_reference(models, texts, [clip_skip, None]), REL, name)
    if clip_skip:
        unskipped = ours(models, texts[:1]).context[0]
        assert (got.context[0] - unskipped).abs().max() > 1e-2, "clip skip changed nothing"


def test_plain_long_prompt_is_cut_and_counted(models):
    texts = [SD15_LONG, "a dog"]
    got = ours(models, texts)
    n = len(Tokenizer().encode_ids(SD15_LONG))
    assert n > 75 and got.dropped == [n - 75, 0]
    assert_close_scaled(got.context, diffusers_reference(models, texts, [None, None]), REL, "plain long prompt")


def test_bad_clip_skip_and_style(models):
    too_many = min(e.cfg.layers for e in models.ours) - (1 if models.sdxl else 0) + 1
    with pytest.raises(InputError, match="clip_skip: must be a whole number from 0 to"):
        ours(models, ["a cat"], clip_skip=too_many)
    ours(models, ["a cat"], clip_skip=too_many - 1)
    with pytest.raises(InputError, match="prompt_style"):
        ours(models, ["a cat"], style="fancy")


# ---------------------------------------------------------------- the CLI

def test_cli_says_what_a_plain_prompt_dropped_and_how_to_keep_it(tmp_path, capsys):
    """On the shipped tiny model: the warning, and --weighted / --clip-skip reaching the settings."""
    import json

    from PIL import Image

    from sd.cli import main
    run = ["generate", SD15_LONG, "--model", "tiny", "--device", "cpu", "--steps", "2", "--seed", "1"]
    assert main(run + ["-o", str(tmp_path / "plain.png")]) == 0
    n = len(Tokenizer().encode_ids(SD15_LONG)) - 75
    err = capsys.readouterr().err
    assert f"warning: the prompt's last {n} tokens were dropped" in err and "--weighted keeps them" in err
    assert main(run + ["-o", str(tmp_path / "weighted.png"), "--weighted", "--clip-skip", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
    settings = json.loads(Image.open(tmp_path / "weighted.png").text["sd"])
    assert settings["prompt_style"] == "weighted" and settings["clip_skip"] == 1
    assert "prompt_tokens_dropped" not in settings
    assert main(run + ["-o", str(tmp_path / "bad.png"), "--clip-skip", "-1"]) == 2
    assert "--clip-skip: must be a whole number of at least 0" in capsys.readouterr().err
