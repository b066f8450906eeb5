"""The safetensors wire format: round trips, shard concatenation, and hostile bodies."""

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from shared.errors import BadTensor, PayloadTooLarge
from shared.wire import concat_files, decode, encode


def test_round_trip_keeps_dtype_shape_values_and_metadata() -> None:
    tensors = {
        "inputs_embeds": torch.randn(2, 3, 8),
        "half": torch.randn(4).half(),
        "bf": torch.randn(4).bfloat16(),
        "mask": torch.ones(2, 3, dtype=torch.int64),
    }
    out, meta = decode(encode(tensors, {"key_version": "3"}))
    assert meta == {"key_version": "3"}
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(value: float) -> None:
    with pytest.raises(BadTensor, match="NaN or Inf"):
        decode(encode({"x": torch.tensor([1.0, value])}))


def test_size_and_header_limits() -> None:
    body = encode({"x": torch.zeros(1000)})
    with pytest.raises(PayloadTooLarge):
        decode(body, max_bytes=100)
    with pytest.raises(PayloadTooLarge):
        decode(body, max_header=8)


def test_a_header_length_past_the_body_is_a_truncated_body_not_a_large_header() -> None:
    body = encode({"x": torch.zeros(1000)})
    cut = struct.pack("<Q", 1 << 40) + body[8:100]  # a length no header limit allows, and no body holds
    with pytest.raises(BadTensor, match="exceeds the body: truncated"):
        decode(cut, max_header=1 << 20)
    with pytest.raises(PayloadTooLarge):  # a header that fits the body but not the limit is still 413
        decode(body, max_header=8)


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "shorter"),
        (b"\x05\x00\x00\x00\x00\x00\x00\x00{", "truncated"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (_with_header([1, 2], b""), "not a JSON object"),  # type: ignore[arg-type]
        (_with_header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "data region"),
        (_with_header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "offsets"),
        (_with_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gaps"),
        (_with_header({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype"),
        (_with_header({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "non-negative"),
        (_with_header({"x": "nope"}, b""), "malformed"),
        (_with_header({"__metadata__": {"a": 1}}, b""), "__metadata__"),
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(BadTensor, match=message):
        decode(body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_fuzzed_bodies_raise_only_bad_tensor(prefix: bytes, cut: int) -> None:
    """Random bytes, or a valid body cut or corrupted anywhere: BadTensor or success, nothing else."""
    valid = encode({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)})
    for body in (prefix, valid[:cut], valid[:cut] + prefix + valid[cut + len(prefix) :]):
        with contextlib.suppress(BadTensor):
            decode(body)


def test_concat_files_streams_shards_as_one_file(tmp_path: Path) -> None:
    shards = [
        {"a": torch.randn(3, 5), "b": torch.arange(7)},
        {"c": torch.randn(2, 2).bfloat16(), "d": torch.randn(1).half()},
    ]
    files = []
    for i, tensors in enumerate(shards):
        save_file(tensors, str(tmp_path / f"s{i}.safetensors"))
        files.append(tmp_path / f"s{i}.safetensors")
    total, chunks = concat_files(files, {"stip.key_version": "2"}, chunk=7)
    body = b"".join(chunks)
    assert len(body) == total
    (tmp_path / "joined.safetensors").write_bytes(body)
    joined = load_file(str(tmp_path / "joined.safetensors"))  # the stock reader accepts it
    out, meta = decode(body)
    assert meta == {"stip.key_version": "2"}
    for tensors in shards:
        for name, t in tensors.items():
            assert torch.equal(joined[name], t) and torch.equal(out[name], t)


def test_concat_files_refuses_duplicate_names(tmp_path: Path) -> None:
    for i in range(2):
        save_file({"a": torch.zeros(1)}, str(tmp_path / f"s{i}.safetensors"))
    with pytest.raises(BadTensor, match="two shards"):
        concat_files([tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"], {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_own_encoder_and_decoder_agree_with_safetensors(dtype: torch.dtype) -> None:
    """wire.encode / wire.decode build and read the layout themselves: safetensors' own
    functions must read what they write and vice versa, byte for byte in the tensors."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b": (torch.randn(2, 3, 5, generator=g) * 4).to(dtype),
        "a": (torch.randn(7, generator=g)).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
        "strided": (torch.randn(4, 6, generator=g)).to(dtype)[:, ::2],
    }
    meta = {"deployment": "dep-1", "n": "3"}
    theirs = st_load(encode(tensors, meta))
    ours, got_meta = decode(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    assert got_meta == meta
    for name, t in tensors.items():
        for other in (theirs[name], ours[name]):
            assert other.dtype == t.dtype and other.shape == t.shape and torch.equal(other, t)
    ours["a"].zero_()  # decoded tensors own their memory: writable, without a warning
