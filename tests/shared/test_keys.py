"""Key material: CSPRNG draws, GQA-consistent head layouts, safetensors round trip, 0600 files."""

import os
import stat

import pytest
import torch

from shared.errors import KeyFormatError
from shared.keys import DeveloperKey, ModelDims, UserKey, draw_key
from shared.permutation import inverse, is_permutation, permute, unpermute

DIMS = ModelDims("llama", d_model=32, d_out=50, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=4, d_ff=48, rope=True)


def test_every_permutation_is_valid_and_fresh() -> None:
    a, b = draw_key(DIMS), draw_key(DIMS)
    assert is_permutation(a.pi, 32) and is_permutation(a.pi_c, 50)
    assert not torch.equal(a.pi, b.pi)  # 32! draws: a collision means a fixed seed
    for layer in a.layers:
        assert is_permutation(layer.kv_head, 2) and is_permutation(layer.head, 8)
        assert is_permutation(layer.ffn, 48)
        assert layer.qk is None  # RoPE: only whole heads move
        assert all(is_permutation(p, 4) for p in layer.v)


def test_query_heads_stay_with_their_kv_head() -> None:
    key = draw_key(DIMS)
    g = DIMS.group_size
    for layer in key.layers:
        for j, h in enumerate(layer.head.tolist()):
            assert h // g == int(layer.kv_head[j // g])


def test_row_indices_are_permutations() -> None:
    dims = ModelDims("gpt2", 24, 40, 2, 6, 6, 4, 96, rope=False)
    layer = draw_key(dims).layers[0]
    assert layer.qk is not None
    for idx in (layer.q_rows(dims), layer.k_rows(dims), layer.v_rows(dims), layer.o_cols(dims)):
        assert is_permutation(idx, 24)


def test_permute_and_unpermute_are_inverse() -> None:
    key = draw_key(DIMS)
    x = torch.randn(2, 5, 32)
    assert torch.equal(unpermute(permute(x, key.pi), key.pi), x)
    assert torch.equal(inverse(inverse(key.pi)), key.pi)


def test_round_trip_owner_only_and_fingerprint(tmp_path) -> None:
    key = draw_key(DIMS, key_version=7)
    key.save(tmp_path / "dev" / "key.safetensors")
    key.user.save(tmp_path / "user.safetensors")
    for path in (tmp_path / "dev" / "key.safetensors", tmp_path / "user.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = DeveloperKey.load(tmp_path / "dev" / "key.safetensors")
    assert loaded.dims == DIMS and loaded.user.key_version == 7
    assert loaded.user.fingerprint == key.user.fingerprint
    for a, b in zip(loaded.layers, key.layers, strict=True):
        assert torch.equal(a.head, b.head) and torch.equal(a.ffn, b.ffn) and torch.equal(a.v, b.v)
    user = UserKey.load(tmp_path / "user.safetensors")
    assert torch.equal(user.pi, key.pi) and torch.equal(user.pi_c, key.pi_c)
    assert len(user.fingerprint) == 64 and user.fingerprint != draw_key(DIMS, key_version=7).user.fingerprint


def test_tampered_or_garbage_key_is_refused(tmp_path) -> None:
    key = draw_key(DIMS)
    from safetensors.torch import save_file

    swapped = key.pi.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    save_file({"pi": swapped, "pi_c": key.pi_c}, str(tmp_path / "k.safetensors"), metadata=key.user.metadata())
    with pytest.raises(KeyFormatError, match="fingerprint"):
        UserKey.load(tmp_path / "k.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(KeyFormatError):
        UserKey.load(tmp_path / "bad.safetensors")
