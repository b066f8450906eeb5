"""The GPT-2 family transform against the stock GPT2LMHeadModel, with every parameter randomised.

Each test plays the three parties: P1 transforms θ -> θ′ with a fresh key, P2 runs the stock
class loaded with θ′ (its token table filled with NaN, so any use of it would show, and an
all-zero position table), P3 embeds locally (tokens and positions), sends x·π and un-permutes
the logits with π_c.

Positions: for a left-padded batch, generate() in transformers 5.24 passes
`position_ids = cumsum(mask) - 1` (padding at 0), so real tokens count from 0 in every row.
P3 mirrors it with a per-row offset of `-n_pad` (then `past_length - n_pad` when decoding).
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
from shared.families.gpt2 import HEAD, WPE, WTE
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

FAMILY = get_family("gpt2")
VOCAB = 97


def make_config(**kw: object) -> transformers.GPT2Config:
    args: dict[str, object] = dict(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    args.update(kw)
    return transformers.GPT2Config(**args)


def original_model(config: transformers.GPT2Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    return randomize_parameters(model, scale=0.3, seed=seed)


def deploy(
    model: torch.nn.Module, key: DeveloperKey | None = None
) -> tuple[dict, DeveloperKey, torch.nn.Module, dict[str, torch.Tensor]]:
    return deploy_decoder(FAMILY, model, WTE, key)


cloud_logits = partial(decoder_logits, FAMILY)


# --- equivalence with the stock class ----------------------------------------------------

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "n_inner": {"n_inner": 24, "activation_function": "gelu"},
    "untied": {"tie_word_embeddings": False},
    "scaled-upcast": {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
    "eager-1head": {"n_head": 1, "attn_implementation": "eager"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_stock_class(variant: str) -> None:
    assert_matches_stock(FAMILY, original_model(make_config(**VARIANTS[variant])), WTE, VOCAB)


def test_generate_positions_mirror_transformers() -> None:
    """The test's position ids are those generate() itself computes for a padded batch."""
    model = original_model(make_config())
    ids, mask = left_padded(3, 6, vocab=VOCAB)
    kwargs = {"attention_mask": mask}
    ours = generate_positions(mask)
    theirs = model._prepare_position_ids_for_generation(ids, kwargs)
    assert torch.equal(ours, theirs)
    assert ours[2].tolist() == [0, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("variant", ["default", "untied"])
def test_left_padding(variant: str) -> None:
    assert_close(*padded_logits(FAMILY, original_model(make_config(**VARIANTS[variant])), WTE, VOCAB))


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_matches_full_forward(padded: bool) -> None:
    assert_kv_cache_matches_full_forward(FAMILY, original_model(make_config(n_inner=40)), WTE, VOCAB, padded=padded)


def test_kv_cache_without_mask() -> None:
    """Unpadded session without an attention mask: P3's offset is the session length."""
    model = original_model(make_config())
    config, key, cloud_model, user = deploy(model)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    logits, cache = cloud_logits(config, key, cloud_model, user, ids[:, :4], None)
    steps = [logits]
    for t in range(4, 8):
        logits, cache = cloud_logits(config, key, cloud_model, user, ids[:, t : t + 1], None, cache)
        steps.append(logits)
    assert_close(ref, torch.cat(steps, dim=1))


@pytest.mark.parametrize("variant", ["default", "untied"])
def test_greedy_generation_matches_generate(variant: str) -> None:
    assert_greedy_matches_generate(FAMILY, original_model(make_config(**VARIANTS[variant])), WTE, VOCAB)


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
    config = make_config(
        n_embd=n_head * head_dim,
        n_head=n_head,
        n_layer=n_layer,
        n_inner=n_inner,
        tie_word_embeddings=tied,
    )
    ref, got = padded_logits(FAMILY, original_model(config, seed=seed), WTE, VOCAB, batch=2, seq=5, seed=seed)
    assert max_abs_diff(ref, got) <= TOL


# --- the transform really hides things ---------------------------------------------------


def _without(key: DeveloperKey, part: str) -> DeveloperKey:
    """The same key with one of its permutations replaced by the identity."""
    dims = key.dims
    if part in ("pi", "pi_c"):
        n = dims.d_model if part == "pi" else dims.d_out
        return replace(key, user=replace(key.user, **{part: torch.arange(n)}))
    ident = torch.arange(dims.head_dim).expand(dims.n_heads, -1).clone()
    layers = []
    for lk in key.layers:
        if part == "head":
            lk = replace(lk, kv_head=torch.arange(dims.n_heads), head=torch.arange(dims.n_heads))
        elif part in ("qk", "v"):
            lk = replace(lk, **{part: ident})
        elif part == "ffn":
            lk = replace(lk, ffn=torch.arange(dims.d_ff))
        else:
            raise ValueError(part)
        layers.append(lk)
    return replace(key, layers=tuple(layers))


AFFECTED = {  # which cloud tensors of a layer each inner permutation must change
    "head": {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight"},
    "qk": {"attn.c_attn.weight", "attn.c_attn.bias"},
    "v": {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight"},
    "ffn": {"mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight"},
}


@pytest.mark.parametrize("part", ["pi", "pi_c", *AFFECTED])
def test_each_permutation_changes_the_cloud_weights(part: str) -> None:
    """Would fail if the family skipped a permutation, or applied it where it does not belong."""
    model = original_model(make_config(n_inner=24))
    config = model.config.to_dict()
    key = nonidentity_key(FAMILY.dims(config))
    cloud, _ = transform_state_dict(FAMILY, model.state_dict(), key, config)
    other, _ = transform_state_dict(FAMILY, model.state_dict(), _without(key, part), config)
    changed = {n for n in cloud if not torch.equal(cloud[n], other[n])}
    if part == "pi":
        # every tensor that reads or writes the residual stream (not the inner-unit biases,
        # not the zero position table)
        expected = {n for n in cloud if not n.endswith(("c_attn.bias", "c_fc.bias")) and n != WPE}
    elif part == "pi_c":
        expected = {HEAD}
    else:
        expected = {n for n in cloud if n.split(".", 3)[-1] in AFFECTED[part]}
    assert expected  # the test checks something
    assert changed == expected


@pytest.mark.parametrize("tied", [True, False])
def test_cloud_gets_no_embedding(tied: bool) -> None:
    model = original_model(make_config(tie_word_embeddings=tied))
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
    model = original_model(make_config())
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
    model = original_model(make_config())
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
    model = original_model(make_config(n_inner=24))
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
    for bad in (
        "transformer.h.0.attn.q_attn.weight",
        "transformer.h.5.ln_1.weight",
        "model.h.0.ln_1.weight",
        "foo.transformer.h.0.ln_1.weight",
        "transformer.ln_g.weight",
        "score.weight",
    ):
        with pytest.raises(CheckpointError, match="unexpected"):
            FAMILY.transform(bad, torch.zeros(32), key, config)
    no_wpe = {n: t for n, t in state.items() if n != WPE}
    with pytest.raises(CheckpointError, match="embedding"):
        transform_state_dict(FAMILY, no_wpe, key, config)
