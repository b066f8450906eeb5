"""The Llama family transform against the stock LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM, with every parameter randomised.

Each test plays the three parties: P1 transforms θ -> θ′ with a fresh key, P2 runs the stock
class loaded with θ′ (its embedding table filled with NaN, so any use of it would show), P3
embeds locally, sends x·π and un-permutes the logits with π_c.
"""

from dataclasses import replace
from functools import partial

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import CheckpointError
from shared.families import get_family
from shared.families.llama import EMBED, HEAD
from shared.keys import DeveloperKey, draw_key
from shared.transform import transform_state_dict
from tests.shared.decoder_checks import (
    assert_greedy_matches_generate,
    assert_kv_cache_matches_full_forward,
    assert_matches_stock,
    padded_logits,
)
from tests.support import (
    TOL,
    assert_close,
    decoder_logits,
    deploy_decoder,
    generate_positions,
    left_padded,
    max_abs_diff,
    nonidentity_key,
    randomize_parameters,
)

FAMILY = get_family("llama")
VOCAB = 101

CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def make_config(kind: str = "llama", **kw: object) -> transformers.PretrainedConfig:
    config_cls, _ = CLASSES[kind]
    args: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    args.update(kw)
    return config_cls(**args)


def original_model(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    _, model_cls = CLASSES[config.model_type]
    torch.manual_seed(seed)
    model = model_cls(config)
    return randomize_parameters(model, scale=0.2, seed=seed)


def deploy(
    model: torch.nn.Module, key: DeveloperKey | None = None
) -> tuple[dict, DeveloperKey, torch.nn.Module, dict[str, torch.Tensor]]:
    return deploy_decoder(FAMILY, model, EMBED, key)


cloud_logits = partial(decoder_logits, FAMILY)


# --- equivalence with the stock classes --------------------------------------------------

VARIANTS = {
    "llama-gqa2": ("llama", {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-headdim": ("llama", {"head_dim": 12, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"num_key_value_heads": 1, "head_dim": 6}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-headdim": ("qwen2", {"tie_word_embeddings": True, "head_dim": 16}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_stock_class(variant: str) -> None:
    kind, kw = VARIANTS[variant]
    assert_matches_stock(FAMILY, original_model(make_config(kind, **kw)), EMBED, VOCAB)


@pytest.mark.parametrize("variant", ["llama-gqa2", "qwen2-tied-headdim", "mistral"])
def test_left_padding(variant: str) -> None:
    kind, kw = VARIANTS[variant]
    assert_close(*padded_logits(FAMILY, original_model(make_config(kind, **kw)), EMBED, VOCAB))


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_matches_full_forward(padded: bool) -> None:
    model = original_model(make_config("qwen2", num_key_value_heads=1))
    assert_kv_cache_matches_full_forward(FAMILY, model, EMBED, VOCAB, padded=padded)


@pytest.mark.parametrize("variant", ["llama-gqa2", "mistral"])
def test_last_only_runs_the_head_on_one_position(variant: str) -> None:
    kind, kw = VARIANTS[variant]
    model = original_model(make_config(kind, **kw))
    config, key, cloud_model, user = deploy(model)
    ids, mask = left_padded(3, 8, vocab=VOCAB)
    head_rows: list[int] = []
    hook = cloud_model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[1]))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=generate_positions(mask)).logits
    try:
        got, cache = cloud_logits(config, key, cloud_model, user, ids, mask, last_only=True)
    finally:
        hook.remove()
    assert head_rows == [1] and got.shape == (3, 1, VOCAB)
    assert_close(ref[:, -1:], got)
    assert cache.get_seq_length() == 8  # the cache still holds every position


@pytest.mark.parametrize("variant", ["llama-gqa2", "qwen2-tied-headdim"])
def test_greedy_generation_matches_generate(variant: str) -> None:
    kind, kw = VARIANTS[variant]
    assert_greedy_matches_generate(FAMILY, original_model(make_config(kind, **kw)), EMBED, VOCAB)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(CLASSES)),
    n_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 6, 8]),
    n_layers=st.integers(1, 3),
    width=st.sampled_from([2, 4]),
    d_ff=st.integers(4, 40),
    tied=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_dims(
    kind: str,
    n_kv: int,
    group: int,
    head_dim: int,
    n_layers: int,
    width: int,
    d_ff: int,
    tied: bool,
    seed: int,
) -> None:
    # transformers wants hidden_size divisible by the head count, even with an explicit head_dim
    config = make_config(
        kind,
        hidden_size=n_kv * group * width,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_kv * group,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        tie_word_embeddings=tied,
    )
    ref, got = padded_logits(FAMILY, original_model(config, seed=seed), EMBED, VOCAB, batch=2, seq=5, seed=seed)
    assert max_abs_diff(ref, got) <= TOL


# --- the transform really hides things ---------------------------------------------------


def _without(key: DeveloperKey, part: str) -> DeveloperKey:
    """The same key with one of its permutations replaced by the identity."""
    dims = key.dims
    if part in ("pi", "pi_c"):
        n = dims.d_model if part == "pi" else dims.d_out
        return replace(key, user=replace(key.user, **{part: torch.arange(n)}))
    g = dims.group_size
    layers = []
    for lk in key.layers:
        if part == "kv_head":  # move no KV head, keep the order of queries within each group
            within = lk.head - lk.kv_head.repeat_interleave(g) * g
            lk = replace(lk, kv_head=torch.arange(dims.n_kv_heads))
            lk = replace(lk, head=lk.kv_head.repeat_interleave(g) * g + within)
        elif part == "group":  # keep the KV heads moved, the queries within a group in place
            lk = replace(
                lk,
                head=lk.kv_head.repeat_interleave(g) * g + torch.arange(g).repeat(dims.n_kv_heads),
            )
        elif part == "v":
            lk = replace(lk, v=torch.arange(dims.head_dim).expand(dims.n_kv_heads, -1).clone())
        elif part == "ffn":
            lk = replace(lk, ffn=torch.arange(dims.d_ff))
        else:
            raise ValueError(part)
        layers.append(lk)
    return replace(key, layers=tuple(layers))


ATTN = "self_attn."
AFFECTED = {  # which cloud tensors of a layer each permutation must change
    "kv_head": {
        "q_proj.weight",
        "q_proj.bias",
        "k_proj.weight",
        "k_proj.bias",
        "v_proj.weight",
        "v_proj.bias",
        "o_proj.weight",
    },
    "group": {"q_proj.weight", "q_proj.bias", "o_proj.weight"},
    "v": {"v_proj.weight", "v_proj.bias", "o_proj.weight"},
    "ffn": {
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
        "gate_proj.bias",
        "up_proj.bias",
    },
}


@pytest.mark.parametrize("part", ["pi", "pi_c", *AFFECTED])
def test_each_permutation_changes_the_cloud_weights(part: str) -> None:
    """Would fail if the family skipped a permutation, or applied it where it does not belong."""
    model = original_model(make_config("llama", num_key_value_heads=2, attention_bias=True, mlp_bias=True))
    config = model.config.to_dict()
    key = nonidentity_key(FAMILY.dims(config))
    cloud, _ = transform_state_dict(FAMILY, model.state_dict(), key, config)
    other, _ = transform_state_dict(FAMILY, model.state_dict(), _without(key, part), config)
    changed = {n for n in cloud if not torch.equal(cloud[n], other[n])}
    if part == "pi":
        # every tensor that reads or writes the residual stream; biases of inner units do not
        inner = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias")
        expected = {n for n in cloud if not n.endswith(inner)}
    elif part == "pi_c":
        expected = {HEAD}
    else:
        expected = {n for n in cloud if n.split(".", 4)[-1] in AFFECTED[part]}
    assert expected  # the test checks something
    assert changed == expected


@pytest.mark.parametrize("tied", [False, True])
def test_cloud_gets_no_embedding(tied: bool) -> None:
    model = original_model(make_config("qwen2", tie_word_embeddings=tied))
    config = model.config.to_dict()
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    cloud, user = transform_state_dict(FAMILY, state, key, config)
    table = state[EMBED]
    assert set(user) == {EMBED} and torch.equal(user[EMBED], table)
    assert not any("embed" in n for n in cloud)
    assert not any(t.shape == table.shape and torch.equal(t, table) for t in cloud.values())
    # The head P2 gets is πᵀ W_c π_c, untied even when the original is tied.
    w_c = state[HEAD]
    assert torch.equal(cloud[HEAD], w_c[key.pi_c][:, key.pi])
    assert not torch.equal(cloud[HEAD], w_c)


# --- bad checkpoints ---------------------------------------------------------------------


def test_wrong_shape_and_unknown_names_are_refused() -> None:
    model = original_model(make_config("llama"))
    config = model.config.to_dict()
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    bad_shape = dict(state, **{q: state[q][:-1]})
    with pytest.raises(CheckpointError, match="q_proj"):
        transform_state_dict(FAMILY, bad_shape, key, config)
    with pytest.raises(CheckpointError, match="shape"):
        FAMILY.transform(EMBED, state[EMBED].T, key, config)
    for name in (
        "model.layers.0.self_attn.rotary.weight",
        "model.layers.9.mlp.up_proj.weight",
        "foo.bar",
    ):
        with pytest.raises(CheckpointError, match="unexpected"):
            FAMILY.transform(name, torch.zeros(3), key, config)
    no_embedding = {n: t for n, t in state.items() if n != EMBED}
    with pytest.raises(CheckpointError, match="embedding"):
        transform_state_dict(FAMILY, no_embedding, key, config)
