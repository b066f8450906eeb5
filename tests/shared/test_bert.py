"""The BERT family against the stock `BertModel`, every parameter randomised."""

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import UnsupportedModel
from shared.families import detect_family, get_family
from shared.families.bert import EMBEDDING_NAMES, BertFamily
from shared.keys import DeveloperKey, draw_key
from shared.permutation import permute, unpermute
from shared.transform import transform_state_dict
from tests.shared.encoder_models import ANY_LENGTHS, ANY_SIZES, tiny_bert
from tests.shared.family_checks import assert_layer_moves, moved, with_identity
from tests.support import max_abs_diff

FAMILY = get_family("bert")
TOL = 1e-4


def deploy(model: transformers.BertModel, config: dict, key: DeveloperKey | None = None):
    key = key or draw_key(FAMILY.dims(config))
    cloud, user = transform_state_dict(FAMILY, model.state_dict(), key, config)
    cloud_model = FAMILY.build_cloud_model(config)
    result = cloud_model.load_state_dict(cloud, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(EMBEDDING_NAMES)  # only the unused embeddings
    return key, cloud, user, cloud_model


def padded_batch(batch: int, seq: int, lengths: list[int], vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()  # right padding
    token_types = torch.randint(0, 2, (batch, seq), generator=g)
    return ids, mask, token_types


@torch.no_grad()
def compare(model, config, ids, mask, token_types) -> tuple[float, float]:
    key, _, user, cloud_model = deploy(model, config)
    ref = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    x = FAMILY.embed(user, config, ids, token_type_ids=token_types)  # user side
    out = FAMILY.cloud_forward(cloud_model, permute(x, key.pi), mask)  # cloud side
    assert out.cache is None and out.pooled is not None
    hidden = unpermute(out.output, key.pi)  # user side: y = y′·πᵀ
    pooled = unpermute(out.pooled, key.pi)
    return max_abs_diff(hidden, ref.last_hidden_state), max_abs_diff(pooled, ref.pooler_output)


def test_lossless_with_padding() -> None:
    model, config = tiny_bert()
    ids, mask, token_types = padded_batch(4, 12, [12, 7, 3, 1], 61)
    d_hidden, d_pooled = compare(model, config, ids, mask, token_types)
    assert d_hidden <= TOL
    assert d_pooled <= TOL


def test_lossless_without_mask() -> None:
    model, config = tiny_bert(n_heads=2, head_dim=6, n_layers=3)
    ids, _, token_types = padded_batch(2, 9, [9, 9], 61)
    with torch.no_grad():
        key, _, user, cloud_model = deploy(model, config)
        ref = model(input_ids=ids, token_type_ids=token_types).last_hidden_state
        x = FAMILY.embed(user, config, ids, token_type_ids=token_types)
        out = FAMILY.cloud_forward(cloud_model, permute(x, key.pi), None)
    assert max_abs_diff(unpermute(out.output, key.pi), ref) <= TOL


@settings(max_examples=10, deadline=None)
@given(sizes=ANY_SIZES, lengths=ANY_LENGTHS, seed=st.integers(0, 2**16))
def test_lossless_property(sizes: dict[str, int], lengths: list[int], seed: int) -> None:
    model, config = tiny_bert(**sizes, seed=seed)
    ids, mask, token_types = padded_batch(len(lengths), max(lengths), lengths, 61, seed=seed)
    d_hidden, d_pooled = compare(model, config, ids, mask, token_types)
    assert d_hidden <= TOL
    assert d_pooled <= TOL


@torch.no_grad()
def test_embed_matches_bert_embeddings_at_an_offset() -> None:
    model, config = tiny_bert()
    _, _, user, _ = deploy(model, config)
    ids, _, token_types = padded_batch(2, 5, [5, 5], 61)
    positions = torch.arange(7, 12)[None].expand(2, -1)
    ref = model.embeddings(input_ids=ids, token_type_ids=token_types, position_ids=positions)
    ours = FAMILY.embed(user, config, ids, position_offset=7, token_type_ids=token_types)
    assert max_abs_diff(ours, ref) <= 1e-6
    # no token types means type 0, as in the stock module
    assert max_abs_diff(FAMILY.embed(user, config, ids), model.embeddings(input_ids=ids)) <= 1e-6


def test_encoder_key_reuses_pi(tmp_path) -> None:
    _, config = tiny_bert()
    dims = FAMILY.dims(config)
    assert dims.encoder and dims.d_out == dims.d_model and not dims.rope
    key = draw_key(dims)
    assert torch.equal(key.pi_c, key.pi)
    key.save(tmp_path / "k.safetensors")  # pi_c is a copy: safetensors refuses shared memory
    loaded = DeveloperKey.load(tmp_path / "k.safetensors")
    assert torch.equal(loaded.pi_c, key.pi) and loaded.dims == dims


# which tensors of the layer each inner permutation moves
_Q = {"attention.self.query.weight", "attention.self.query.bias"}
_K = {"attention.self.key.weight", "attention.self.key.bias"}
_V = {"attention.self.value.weight", "attention.self.value.bias"}
_O = {"attention.output.dense.weight"}
_MOVES = {
    "head": _Q | _K | _V | _O,
    "qk": _Q | _K,
    "v": _V | _O,
    "ffn": {"intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight"},
}


def test_every_permutation_moves_the_cloud_weights() -> None:
    """Fails if any permutation were drawn as the identity or skipped by the transform (and each
    cloud tensor differs from the original one)."""
    model, config = tiny_bert(n_heads=12, head_dim=4, n_layers=2, d_ff=64)
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    cloud, _ = assert_layer_moves(
        FAMILY, state, config, key, tuple(_MOVES), lambda i, part: {f"encoder.layer.{i}.{r}" for r in _MOVES[part]}
    )
    # π moves every cloud tensor except the Q/K/V biases and the FFN-in bias (no d axis)
    untouched = ("self.query.bias", "self.key.bias", "self.value.bias", "intermediate.dense.bias")
    changed = moved(FAMILY, state, config, cloud, with_identity(key, "pi", "pi_c"))
    assert changed == {n for n in cloud if not n.endswith(untouched)}


def test_cloud_holds_no_embedding() -> None:
    model, config = tiny_bert()
    state = dict(model.state_dict())
    state["embeddings.position_ids"] = torch.arange(24)[None]  # a buffer some checkpoints store
    key = draw_key(FAMILY.dims(config))
    cloud, user = transform_state_dict(FAMILY, state, key, config)
    assert sorted(user) == sorted(EMBEDDING_NAMES)
    assert not any("embeddings" in n for n in cloud)
    assert set(cloud) == {n for n in model.state_dict() if not n.startswith("embeddings.")}
    for name, t in cloud.items():
        for emb in user.values():
            assert t.shape != emb.shape or not torch.equal(t, emb), name
    assert "pooler.dense.weight" in cloud


def test_accepts_bert_prefix_and_drops_pretraining_heads() -> None:
    model, config = tiny_bert()
    key = draw_key(FAMILY.dims(config))
    cloud, user = transform_state_dict(FAMILY, model.state_dict(), key, config)
    prefixed = {f"bert.{n}": t for n, t in model.state_dict().items()}
    prefixed["cls.predictions.bias"] = torch.zeros(61)
    prefixed["cls.predictions.transform.dense.weight"] = torch.zeros(32, 32)
    cloud2, user2 = transform_state_dict(FAMILY, prefixed, key, config)
    assert cloud2.keys() == cloud.keys() and user2.keys() == user.keys()
    assert all(torch.equal(cloud[n], cloud2[n]) for n in cloud)


def test_detection_and_unsupported_configs() -> None:
    _, config = tiny_bert()
    assert isinstance(detect_family(config), BertFamily)
    assert isinstance(detect_family(dict(config, architectures=["BertForMaskedLM"])), BertFamily)
    with pytest.raises(UnsupportedModel):
        FAMILY.dims(dict(config, is_decoder=True))
    with pytest.raises(UnsupportedModel):
        FAMILY.dims(dict(config, position_embedding_type="relative_key"))
    with pytest.raises(ValueError):
        FAMILY.cloud_forward(FAMILY.build_cloud_model(config), torch.zeros(1, 2, 32), None, cache=object())
