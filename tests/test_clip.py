"""sd.clip.CLIPTextModel vs transformers' CLIPTextModel / CLIPTextModelWithProjection on tiny
random-weight configs. Weights are randomised on our side (every parameter, LayerNorm weights ~1+noise)
and loaded into transformers, so a swapped norm, a wrong activation or a wrong pooling index shows up.

Tolerance: fp32 on both sides, torch.testing.assert_close(rtol=1e-4, atol=1e-5).
"""

import pytest
import torch
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from helpers import assert_same_norms, max_diff, randomize_params, report
from sd.clip import CLIPConfig, CLIPTextModel
from sd.tokenizer import Tokenizer

RTOL, ATOL = 1e-4, 1e-5  # fp32

PROMPTS = [
    "a photo of a cat",
    "",
    "A majestic lion, golden hour, 35mm, highly detailed, trending on artstation, by greg rutkowski",
    "hello <|endoftext|> world",  # literal end token: pooled at the first one
    " ".join(["an astronaut riding a horse on mars"] * 12),  # truncated: no padding at all
]

# (width, layers, heads, mlp_width, act, projection_dim)
CONFIGS = {
    "w32-l2-quickgelu": (32, 2, 4, 64, "quick_gelu", None),
    "w48-l3-gelu": (48, 3, 4, 96, "gelu", None),
    "w64-l5-quickgelu": (64, 5, 4, 128, "quick_gelu", None),
    "w64-l4-gelu-proj48": (64, 4, 4, 256, "gelu", 48),
    "w32-l2-quickgelu-proj32": (32, 2, 4, 128, "quick_gelu", 32),
}


def build(name, seed=0):
    width, layers, heads, mlp, act, proj = CONFIGS[name]
    ours = CLIPTextModel(CLIPConfig(vocab_size=49408, max_positions=77, width=width, layers=layers, heads=heads,
                                    mlp_width=mlp, act=act, projection_dim=proj)).eval()
    randomize_params(ours, seed=seed, embed_std=0.5)
    hf_cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=width,
                            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                            hidden_act=act, projection_dim=proj or width,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
                            attn_implementation="eager")
    ref = (HFCLIPTextModelWithProjection if proj else HFCLIPTextModel)(hf_cfg).eval()

    sd = ours.state_dict()
    expected = ref.state_dict()
    # transformers 5: the plain model has no `text_model.` prefix, the projection model has it.
    prefix = "text_model." if any(k.startswith("text_model.") for k in expected) else ""
    converted = {(k if k == "text_projection.weight" else prefix + k): v for k, v in sd.items()}
    expected_keys = {k for k in expected if not k.endswith("position_ids")}
    assert set(converted) == expected_keys, (set(converted) ^ expected_keys)
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    assert assert_same_norms(ours, ref, converted) == 2 * layers + 1
    return ours, ref


def compare(name, a, b):
    report(name, *max_diff(a, b))
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def ids():
    return Tokenizer()(PROMPTS)


@pytest.fixture(scope="module")
def tokens(ids):
    # Both paddings in one batch: CLIP-L's (49407) and OpenCLIP bigG's ("!" = 0).
    return torch.cat([ids, Tokenizer(pad_token="!")(PROMPTS)])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_clip_matches_transformers(name, tokens):
    torch.manual_seed(0)
    ours, ref = build(name)
    with torch.no_grad():
        out = ours(tokens)
        hf = ref(input_ids=tokens, output_hidden_states=True)

    width, layers, _, _, _, proj = CONFIGS[name]
    assert out.last_hidden_state.shape == (len(tokens), 77, width)
    assert len(out.hidden_states) == layers + 1 == len(hf.hidden_states)
    compare(f"clip {name} last_hidden_state", out.last_hidden_state, hf.last_hidden_state)
    for i, (a, b) in enumerate(zip(out.hidden_states, hf.hidden_states)):
        compare(f"clip {name} hidden_states[{i}]", a, b)
    # SD 1.5 / SDXL use the last (normed) and penultimate (un-normed) states: they must differ.
    assert not torch.allclose(out.last_hidden_state, out.hidden_states[-1], atol=1e-3)
    pooled_ref = hf.text_embeds if proj else hf.pooler_output
    assert out.pooled.shape == (len(tokens), proj or width)
    compare(f"clip {name} pooled", out.pooled, pooled_ref)


def test_pooled_is_taken_at_first_end_token(ids):
    """Sanity: the pooled vector of each prompt is the final-normed state at its first end token, and
    that position varies across the batch (so a fixed index would fail the parity test above)."""
    ours, _ = build("w32-l2-quickgelu", seed=1)
    with torch.no_grad():
        out = ours(ids)
    end = (ids == 49407).int().argmax(dim=1)
    assert len(set(end.tolist())) == len(PROMPTS)
    torch.testing.assert_close(out.pooled, out.last_hidden_state[torch.arange(len(ids)), end])
