"""The Llama family transform against the stock LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM, with every parameter randomised.

Each test plays the three parties: P1 transforms θ -> θ′ with a fresh key, P2 runs the stock
class loaded with θ′ (its embedding table filled with NaN, so any use of it would show), P3
embeds locally, sends x·π and un-permutes the logits with π_c.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import CheckpointError
from shared.families.llama import EMBED, HEAD
from shared.keys import draw_key
from shared.transform import transform_state_dict
from tests.shared.decoder_checks import padded_logits
from tests.shared.decoder_models import DECODERS, decoder_model, variant_model
from tests.shared.family_checks import Moves, assert_each_permutation_moves, assert_refused_by_name
from tests.support import TOL, assert_close, generate_positions, left_padded, max_abs_diff

LLAMA = DECODERS["llama"]
FAMILY, VOCAB = LLAMA.family, LLAMA.vocab


@pytest.mark.parametrize("variant", ["llama-gqa2", "mistral"])
def test_last_only_runs_the_head_on_one_position(variant: str) -> None:
    decoder, model = variant_model(variant)
    deployed = decoder.deploy(model)
    ids, mask = left_padded(3, 8, vocab=VOCAB)
    head_rows: list[int] = []
    hook = deployed.cloud_model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[1]))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=generate_positions(mask)).logits
    try:
        got, cache = deployed.logits(ids, mask, last_only=True)
    finally:
        hook.remove()
    assert head_rows == [1] and got.shape == (3, 1, VOCAB)
    assert_close(ref[:, -1:], got)
    assert cache.get_seq_length() == 8  # the cache still holds every position


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["llama", "mistral", "qwen2"]),
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
    decoder, model = decoder_model(
        kind,
        seed,
        hidden_size=n_kv * group * width,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_kv * group,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        tie_word_embeddings=tied,
    )
    ref, got = padded_logits(decoder, model, batch=2, seq=5, seed=seed)
    assert max_abs_diff(ref, got) <= TOL


# --- the transform really hides things ---------------------------------------------------


MOVES = Moves(  # which cloud tensors each permutation must change
    inner=("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias"),  # biases of inner units
    head=frozenset({HEAD}),
    depth=4,  # model.layers.{i}.self_attn. / model.layers.{i}.mlp.
    layer={
        "kv_head": {f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")} | {"o_proj.weight"},
        "group": {"q_proj.weight", "q_proj.bias", "o_proj.weight"},
        "v": {"v_proj.weight", "v_proj.bias", "o_proj.weight"},
        "ffn": {"gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate_proj.bias", "up_proj.bias"},
    },
)


@pytest.mark.parametrize("part", ["pi", "pi_c", *MOVES.layer])
def test_each_permutation_changes_the_cloud_weights(part: str) -> None:
    model = LLAMA.model(LLAMA.config(num_key_value_heads=2, attention_bias=True, mlp_bias=True))
    assert_each_permutation_moves(FAMILY, model.state_dict(), model.config.to_dict(), part, MOVES)


@pytest.mark.parametrize("tied", [False, True])
def test_cloud_gets_no_embedding(tied: bool) -> None:
    _, model = decoder_model("qwen2", tie_word_embeddings=tied)
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
    model = LLAMA.model()
    config = model.config.to_dict()
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    bad_shape = dict(state, **{q: state[q][:-1]})
    with pytest.raises(CheckpointError, match="q_proj"):
        transform_state_dict(FAMILY, bad_shape, key, config)
    with pytest.raises(CheckpointError, match="shape"):
        FAMILY.transform(EMBED, state[EMBED].T, key, config)
    unexpected = ("model.layers.0.self_attn.rotary.weight", "model.layers.9.mlp.up_proj.weight", "foo.bar")
    assert_refused_by_name(FAMILY, state, key, config, unexpected=unexpected, embedding=EMBED, shape=(3,))
