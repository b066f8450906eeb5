"""The paper's Transformer (encoder and masked decoder) against itself on the original weights."""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import CheckpointError
from shared.families import detect_family, get_family
from shared.families.paper import PaperConfig, PaperFamily, PaperTransformer
from shared.keys import DeveloperKey, draw_key
from shared.permutation import permute, unpermute
from shared.transform import transform_state_dict
from tests.shared.encoder_models import ANY_LENGTHS, ANY_SIZES, tiny_paper
from tests.shared.family_checks import assert_layer_moves, moved, with_identity
from tests.support import max_abs_diff

FAMILY = get_family("paper")
TOL = 1e-4
NORMS = ("attn_norm.weight", "attn_norm.bias", "ffn_norm.weight", "ffn_norm.bias")


def padded_batch(lengths: list[int], seq: int, vocab: int = 53, seed: int = 1, left: bool = False):
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask.flip(1) if left else mask


def cloud_logits(cloud: dict, user: dict, key: DeveloperKey, config: dict, ids, mask) -> torch.Tensor:
    model = FAMILY.build_cloud_model(config)
    model.load_state_dict(cloud, strict=True)  # the cloud copy has exactly θ′: no embedding module
    x = FAMILY.embed(user, config, ids)  # user side
    out = FAMILY.cloud_forward(model, permute(x, key.pi), mask)  # cloud side
    assert out.cache is None and out.pooled is None
    return unpermute(out.output, key.pi_c)  # user side: o = o′·π_cᵀ


@torch.no_grad()
def lossless_diff(model: PaperTransformer, config: dict, ids, mask) -> float:
    key = draw_key(FAMILY.dims(config))
    cloud, user = transform_state_dict(FAMILY, model.state_dict(), key, config)
    ref = model(ids, attention_mask=mask)
    return max_abs_diff(cloud_logits(cloud, user, key, config, ids, mask), ref)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_lossless_with_padding(causal: bool, left: bool) -> None:
    model, config = tiny_paper(causal=causal)
    ids, mask = padded_batch([10, 6, 2, 1], 10, left=left)
    assert lossless_diff(model, config, ids, mask) <= TOL


@pytest.mark.parametrize("causal", [False, True])
def test_lossless_without_mask(causal: bool) -> None:
    model, config = tiny_paper(causal=causal, n_heads=3, head_dim=5, n_layers=3)
    ids, _ = padded_batch([7, 7], 7)
    assert lossless_diff(model, config, ids, None) <= TOL


@settings(max_examples=10, deadline=None)
@given(causal=st.booleans(), sizes=ANY_SIZES, lengths=ANY_LENGTHS, seed=st.integers(0, 2**16))
def test_lossless_property(causal: bool, sizes: dict[str, int], lengths: list[int], seed: int) -> None:
    model, config = tiny_paper(causal=causal, **sizes, seed=seed)
    ids, mask = padded_batch(lengths, max(lengths), seed=seed)
    assert lossless_diff(model, config, ids, mask) <= TOL


@torch.no_grad()
def test_causal_mask_is_causal() -> None:
    """A decoder's logits at position t do not depend on later tokens; an encoder's do."""
    for causal in (True, False):
        model, _ = tiny_paper(causal=causal)
        ids, _ = padded_batch([8], 8)
        changed = ids.clone()
        changed[0, 5] = (changed[0, 5] + 1) % 53
        same_prefix = torch.equal(model(ids)[0, :5], model(changed)[0, :5])
        assert same_prefix == causal


@pytest.mark.parametrize("causal", [False, True])
@torch.no_grad()
def test_leaving_layernorm_unpermuted_is_wrong(causal: bool) -> None:
    """The paper's reference code does not permute LayerNorm weights and biases.

    That is exact for freshly initialised norms (γ = 1, β = 0), which is why it goes unnoticed,
    and wrong for trained (here: random) norms, where our transform stays exact.
    """
    ids, mask = padded_batch([9, 5, 3], 9)
    for random_norms in (False, True):
        model, config = tiny_paper(causal=causal)
        if not random_norms:
            for block in model.layers:
                for norm in (block.attn_norm, block.ffn_norm):
                    norm.reset_parameters()  # γ = 1, β = 0
        key = draw_key(FAMILY.dims(config))
        cloud, user = transform_state_dict(FAMILY, model.state_dict(), key, config)
        state = model.state_dict()
        buggy = {n: (state[n] if n.endswith(NORMS) else t) for n, t in cloud.items()}
        ref = model(ids, attention_mask=mask)
        ours = max_abs_diff(cloud_logits(cloud, user, key, config, ids, mask), ref)
        theirs = max_abs_diff(cloud_logits(buggy, user, key, config, ids, mask), ref)
        assert ours <= TOL
        if random_norms:
            assert theirs > 0.1
        else:
            assert theirs <= TOL


_MOVES = {
    "head": {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
             "v_proj.bias", "o_proj.weight"},
    "qk": {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"},
    "v": {"v_proj.weight", "v_proj.bias", "o_proj.weight"},
    "ffn": {"fc1.weight", "fc1.bias", "fc2.weight"},
}  # fmt: skip


def _layer_tensors(i: int, part: str) -> set[str]:
    return {f"layers.{i}.{'' if r.startswith('fc') else 'self_attn.'}{r}" for r in _MOVES[part]}


def test_every_permutation_moves_the_cloud_weights() -> None:
    """Fails if any permutation were drawn as the identity or skipped by the transform."""
    model, config = tiny_paper(causal=True, n_heads=12, head_dim=4, n_layers=2, d_ff=64)
    key = draw_key(FAMILY.dims(config))
    state = model.state_dict()
    cloud, user = assert_layer_moves(FAMILY, state, config, key, tuple(_MOVES), _layer_tensors)
    untouched = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "fc1.bias", "lm_head.bias")
    changed = partial(moved, FAMILY, state, config, cloud)
    assert changed(with_identity(key, "pi")) == {n for n in cloud if not n.endswith(untouched)}
    assert changed(with_identity(key, "pi_c")) == {"lm_head.weight", "lm_head.bias"}
    # the cloud holds no embedding tensor
    assert sorted(user) == ["embed_positions.weight", "embed_tokens.weight"]
    assert set(cloud) == {n for n in state if not n.startswith("embed_")}
    assert not any(torch.equal(t, e) for t in cloud.values() for e in user.values() if t.shape == e.shape)


def test_config_json_form() -> None:
    _, config = tiny_paper(causal=False)
    assert config["model_type"] == "stip_paper"
    assert config["architectures"] == ["StipPaperTransformer"]
    assert isinstance(detect_family(config), PaperFamily)
    assert PaperConfig.from_json(dict(config, transformers_version="x")).to_json() == config
    dims = FAMILY.dims(config)
    assert (dims.d_model, dims.d_out, dims.rope, dims.encoder) == (32, 53, False, False)
    with pytest.raises(CheckpointError):
        PaperConfig.from_json({k: v for k, v in config.items() if k != "hidden_size"})
    with pytest.raises(CheckpointError):
        PaperConfig.from_json(dict(config, num_attention_heads=5))
    with pytest.raises(ValueError):  # no KV cache to extend
        FAMILY.cloud_forward(FAMILY.build_cloud_model(config), torch.zeros(1, 2, 32), None, cache=object())
