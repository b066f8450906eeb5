"""The GPT-2 family transform against the stock GPT2LMHeadModel, with every parameter randomised.

Each test plays the three parties: P1 transforms θ -> θ′ with a fresh key, P2 runs the stock
class loaded with θ′ (its token table filled with NaN, so any use of it would show, and an
all-zero position table), P3 embeds locally (tokens and positions), sends x·π and un-permutes
the logits with π_c.

Positions: for a left-padded batch, generate() in transformers 5.24 passes
`position_ids = cumsum(mask) - 1` (padding at 0), so real tokens count from 0 in every row.
P3 mirrors it with a per-row offset of `-n_pad` (then `past_length - n_pad` when decoding).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import CheckpointError
from shared.families.gpt2 import HEAD, WPE, WTE
from shared.keys import draw_key
from shared.transform import transform_state_dict
from tests.shared.decoder_checks import padded_logits
from tests.shared.decoder_models import DECODERS
from tests.shared.family_checks import Moves, assert_each_permutation_moves, assert_refused_by_name
from tests.support import TOL, assert_close, generate_positions, left_padded, max_abs_diff

GPT2 = DECODERS["gpt2"]
FAMILY, VOCAB = GPT2.family, GPT2.vocab


def test_generate_positions_mirror_transformers() -> None:
    """The test's position ids are those generate() itself computes for a padded batch."""
    model = GPT2.model()
    ids, mask = left_padded(3, 6, vocab=VOCAB)
    kwargs = {"attention_mask": mask}
    ours = generate_positions(mask)
    theirs = model._prepare_position_ids_for_generation(ids, kwargs)
    assert torch.equal(ours, theirs)
    assert ours[2].tolist() == [0, 0, 0, 1, 2, 3]


def test_kv_cache_without_mask() -> None:
    """Unpadded session without an attention mask: P3's offset is the session length."""
    model = GPT2.model()
    deployed = GPT2.deploy(model)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    logits, cache = deployed.logits(ids[:, :4], None)
    steps = [logits]
    for t in range(4, 8):
        logits, cache = deployed.logits(ids[:, t : t + 1], None, cache)
        steps.append(logits)
    assert_close(ref, torch.cat(steps, dim=1))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_head=st.integers(1, 4),
    head_dim=st.sampled_from([2, 4, 6, 8]),
    n_layer=st.integers(1, 3),
    n_inner=st.one_of(st.none(), st.integers(4, 40)),
    tied=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_dims(
    n_head: int, head_dim: int, n_layer: int, n_inner: int | None, tied: bool, seed: int
) -> None:
    config = GPT2.config(
        n_embd=n_head * head_dim,
        n_head=n_head,
        n_layer=n_layer,
        n_inner=n_inner,
        tie_word_embeddings=tied,
    )
    ref, got = padded_logits(GPT2, GPT2.model(config, seed=seed), batch=2, seq=5, seed=seed)
    assert max_abs_diff(ref, got) <= TOL


# --- the transform really hides things ---------------------------------------------------


MOVES = Moves(  # which cloud tensors each permutation must change
    inner=("c_attn.bias", "c_fc.bias", WPE),  # not the inner-unit biases, not the zero position table
    head=frozenset({HEAD}),
    depth=3,  # transformer.h.{i}.
    layer={
        "head": {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight"},
        "qk": {"attn.c_attn.weight", "attn.c_attn.bias"},
        "v": {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight"},
        "ffn": {"mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight"},
    },
)


@pytest.mark.parametrize("part", ["pi", "pi_c", *MOVES.layer])
def test_each_permutation_changes_the_cloud_weights(part: str) -> None:
    model = GPT2.model(GPT2.config(n_inner=24))
    assert_each_permutation_moves(FAMILY, model.state_dict(), model.config.to_dict(), part, MOVES)


@pytest.mark.parametrize("tied", [True, False])
def test_cloud_gets_no_embedding(tied: bool) -> None:
    model = GPT2.model(GPT2.config(tie_word_embeddings=tied))
    config = model.config.to_dict()
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    cloud, user = transform_state_dict(FAMILY, state, key, config)
    wte, wpe = state[WTE], state[WPE]
    assert set(user) == {WTE, WPE}
    assert torch.equal(user[WTE], wte) and torch.equal(user[WPE], wpe)
    assert not any("wte" in n for n in cloud)
    for t in cloud.values():
        assert not (t.shape == wte.shape and torch.equal(t, wte))
        assert not (t.shape == wpe.shape and torch.equal(t, wpe))
    assert torch.count_nonzero(cloud[WPE]) == 0 and cloud[WPE].shape == wpe.shape
    # The head P2 gets is πᵀ W_c π_c, untied even when the original is tied to wte.
    w_c = state[HEAD]
    assert torch.equal(w_c, wte) == tied
    assert torch.equal(cloud[HEAD], w_c[key.pi_c][:, key.pi])
    assert FAMILY.cloud_config(config)["tie_word_embeddings"] is False


def test_embed_adds_positions_at_the_offset() -> None:
    model = GPT2.model()
    config = model.config.to_dict()
    state = model.state_dict()
    user = {WTE: state[WTE], WPE: state[WPE]}
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    x = FAMILY.embed(user, config, ids, position_offset=4)
    assert torch.equal(x[1, 2], state[WTE][10] + state[WPE][6])
    x = FAMILY.embed(user, config, ids, position_offset=torch.tensor([-1, 2]))
    assert torch.equal(x[0, 0], state[WTE][5] + state[WPE][0])  # padding: clamped to 0
    assert torch.equal(x[0, 2], state[WTE][7] + state[WPE][1])
    assert torch.equal(x[1, 0], state[WTE][8] + state[WPE][2])
    with pytest.raises(ValueError, match="positions"):
        FAMILY.embed(user, config, ids, position_offset=62)


# --- checkpoint names --------------------------------------------------------------------


def test_hub_names_and_buffers() -> None:
    """Hub checkpoints: bare `h.0...` names and the causal-mask buffers `attn.(masked_)bias`."""
    model = GPT2.model()
    config = model.config.to_dict()
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    cloud, user = transform_state_dict(FAMILY, state, key, config)
    hub = {n.removeprefix("transformer."): t for n, t in state.items() if n != HEAD}
    n_pos = config["n_positions"]
    for i in range(config["n_layer"]):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hub_cloud, hub_user = transform_state_dict(FAMILY, hub, key, config)
    assert hub_cloud.keys() == cloud.keys() and hub_user.keys() == user.keys()
    assert all(torch.equal(hub_cloud[n], cloud[n]) for n in cloud)
    assert all(n.startswith("transformer.") or n == HEAD for n in cloud)


def test_wrong_shape_and_unknown_names_are_refused() -> None:
    model = GPT2.model(GPT2.config(n_inner=24))
    config = model.config.to_dict()
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    name = "transformer.h.1.attn.c_attn.weight"
    with pytest.raises(CheckpointError, match="c_attn"):
        transform_state_dict(FAMILY, dict(state, **{name: state[name].T}), key, config)
    fc = "transformer.h.0.mlp.c_fc.weight"  # (d, d_ff): the [out, in] nn.Linear layout is refused
    with pytest.raises(CheckpointError, match="shape"):
        FAMILY.transform(fc, state[fc].T.contiguous(), key, config)
    with pytest.raises(CheckpointError, match="shape"):
        FAMILY.transform("wpe.weight", state[WPE][:-1], key, config)
    unexpected = (
        "transformer.h.0.attn.q_attn.weight",
        "transformer.h.5.ln_1.weight",
        "model.h.0.ln_1.weight",
        "foo.transformer.h.0.ln_1.weight",
        "transformer.ln_g.weight",
        "score.weight",
    )
    assert_refused_by_name(FAMILY, state, key, config, unexpected=unexpected, embedding=WPE)
