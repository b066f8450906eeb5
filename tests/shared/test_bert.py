"""The BERT family against the stock `BertModel`, every parameter randomised."""

import dataclasses

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import CheckpointError, UnsupportedModel
from shared.families import detect_family, get_family
from shared.families.bert import EMBEDDING_NAMES, BertFamily
from shared.keys import DeveloperKey, draw_key
from shared.permutation import permute, unpermute
from shared.transform import transform_state_dict
from tests.support import max_abs_diff, randomize_parameters

FAMILY = get_family("bert")
TOL = 1e-4


def tiny_bert(
    *, n_heads: int = 4, head_dim: int = 8, n_layers: int = 2, d_ff: int = 48, seed: int = 0
) -> tuple[transformers.BertModel, dict]:
    cfg = transformers.BertConfig(
        vocab_size=61,
        hidden_size=n_heads * head_dim,
        num_attention_heads=n_heads,
        num_hidden_layers=n_layers,
        intermediate_size=d_ff,
        max_position_embeddings=24,
        type_vocab_size=2,
    )
    model = randomize_parameters(transformers.BertModel(cfg), seed=seed)
    return model, cfg.to_dict()


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
@given(
    n_heads=st.integers(1, 4),
    head_dim=st.integers(1, 6),
    n_layers=st.integers(1, 3),
    d_ff=st.integers(1, 24),
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_lossless_property(n_heads, head_dim, n_layers, d_ff, lengths, seed) -> None:
    model, config = tiny_bert(n_heads=n_heads, head_dim=head_dim, n_layers=n_layers, d_ff=d_ff, seed=seed)
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


def _identity_key(key: DeveloperKey, layer: int | None, part: str) -> DeveloperKey:
    """The same key with one permutation replaced by the identity."""
    if part == "pi":
        ident = torch.arange(key.pi.numel())
        user = dataclasses.replace(key.user, pi=ident, pi_c=ident.clone())
        return dataclasses.replace(key, user=user)
    lk = key.layers[layer]
    if part == "head":
        ident = torch.arange(lk.head.numel())
        new = dataclasses.replace(lk, head=ident, kv_head=ident.clone())
    else:
        old = getattr(lk, part)
        ident = torch.arange(old.shape[-1]).expand_as(old).contiguous()
        new = dataclasses.replace(lk, **{part: ident})
    layers = tuple(new if i == layer else x for i, x in enumerate(key.layers))
    return dataclasses.replace(key, layers=layers)


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
    """Fails if any permutation were drawn as the identity or skipped by the transform."""
    model, config = tiny_bert(n_heads=12, head_dim=4, n_layers=2, d_ff=64)
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    cloud, _ = transform_state_dict(FAMILY, state, key, config)

    def changed(other: DeveloperKey) -> set[str]:
        alt, _ = transform_state_dict(FAMILY, state, other, config)
        assert alt.keys() == cloud.keys()
        return {n for n in cloud if not torch.equal(cloud[n], alt[n])}

    for i in range(2):
        for part, moved in _MOVES.items():
            assert changed(_identity_key(key, i, part)) == {f"encoder.layer.{i}.{r}" for r in moved}, part
    # π moves every cloud tensor except the Q/K/V biases and the FFN-in bias (no d axis)
    untouched = ("self.query.bias", "self.key.bias", "self.value.bias", "intermediate.dense.bias")
    assert changed(_identity_key(key, None, "pi")) == {n for n in cloud if not n.endswith(untouched)}
    # and each cloud tensor differs from the original one
    for name, t in cloud.items():
        assert not torch.equal(t, state[name]), name


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


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("encoder.layer.0.attention.self.query.weight", (32, 31)),
        ("encoder.layer.1.output.LayerNorm.bias", (33,)),
        ("encoder.layer.0.intermediate.dense.weight", (32, 32)),
        ("pooler.dense.weight", (32, 16)),
        ("embeddings.word_embeddings.weight", (60, 32)),
        ("embeddings.LayerNorm.weight", (31,)),
    ],
)
def test_wrong_shape(name: str, shape: tuple[int, ...]) -> None:
    _, config = tiny_bert()
    key = draw_key(FAMILY.dims(config))
    with pytest.raises(CheckpointError, match="shape"):
        FAMILY.transform(name, torch.zeros(shape), key, config)


@pytest.mark.parametrize(
    "name",
    [
        "encoder.layer.0.attention.self.rotary.weight",
        "encoder.layer.2.output.dense.bias",  # beyond num_hidden_layers
        "classifier.weight",
        "decoder.layer.0.output.dense.bias",
        "bert.bert.pooler.dense.bias",
    ],
)
def test_unknown_name(name: str) -> None:
    _, config = tiny_bert()
    key = draw_key(FAMILY.dims(config))
    with pytest.raises(CheckpointError, match="unexpected"):
        FAMILY.transform(name, torch.zeros(32), key, config)


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
