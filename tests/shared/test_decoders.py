"""Every decoder family against its stock class: GPT2LMHeadModel, LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM and Qwen2MoeForCausalLM, with every
parameter randomised (the variants of tests/shared/decoder_models.py).

Each test plays the three parties: P1 transforms θ -> θ′ with a fresh key, P2 runs the stock
class loaded with θ′ (its token table filled with NaN, so any use of it would show; GPT-2's
position table all zeros), P3 embeds locally (GPT-2: tokens and positions), sends x·π and
un-permutes the logits with π_c. What only one family has is tested in test_gpt2, test_llama and
test_moe.
"""

import pytest

from shared.families import detect_family
from tests.shared.decoder_checks import (
    assert_greedy_matches_generate,
    assert_kv_cache_matches_full_forward,
    assert_matches_stock,
    padded_logits,
)
from tests.shared.decoder_models import VARIANTS, decoder_model, variant_model
from tests.support import assert_close

LEFT_PADDED = [
    "gpt2",
    "gpt2-untied",
    "llama-gqa2",
    "qwen2-tied-headdim",
    "mistral",
    "mixtral-top2",
    "qwen2_moe-normtopk-dense",
]
GREEDY = ["gpt2", "gpt2-untied", "llama-gqa2", "qwen2-tied-headdim", "mixtral-top2", "qwen2_moe-normtopk-dense"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_stock_class(variant: str) -> None:
    decoder, model = variant_model(variant)
    assert detect_family(model.config.to_dict()) is decoder.family
    assert_matches_stock(decoder, model)


@pytest.mark.parametrize("variant", LEFT_PADDED)
def test_left_padding(variant: str) -> None:
    assert_close(*padded_logits(*variant_model(variant)))


@pytest.mark.parametrize(
    ("model_type", "overrides", "padded"),
    [
        ("gpt2", {"n_inner": 40}, False),
        ("gpt2", {"n_inner": 40}, True),
        ("qwen2", {"num_key_value_heads": 1}, False),
        ("qwen2", {"num_key_value_heads": 1}, True),
        ("mixtral", {}, True),
        ("qwen2_moe", {}, True),
    ],
    ids=["gpt2-unpadded", "gpt2-padded", "qwen2-mqa-unpadded", "qwen2-mqa-padded", "mixtral-top2", "qwen2_moe"],
)
def test_kv_cache_matches_full_forward(model_type: str, overrides: dict[str, object], padded: bool) -> None:
    assert_kv_cache_matches_full_forward(*decoder_model(model_type, **overrides), padded=padded)


@pytest.mark.parametrize("variant", GREEDY)
def test_greedy_generation_matches_generate(variant: str) -> None:
    assert_greedy_matches_generate(*variant_model(variant))
