"""Hypothesis against P2's forward body, over HTTP in process.

Starting from valid safetensors bodies, every example damages one thing: random bytes, a flipped
byte, a cut, trailing bytes, a lying header length, header entries with other dtypes, shapes or
offsets (out of range, reversed, negative, not integers), extra or missing tensors, odd metadata,
an oversized or deeply nested header, or well-formed tensors of the wrong dtype, rank, width or
holding NaN/Inf, with random output options. Every answer is a 200 (the damage left a valid
body) or a 4xx in the one error shape, whose message carries neither a token nor a tensor value;
and the valid request sent right after gets exactly the first answer.
"""

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import wire
from shared.api import ATTENTION_MASK, E_BAD_INPUT, E_TOO_LARGE, INPUTS_EMBEDS, LOGITS, TOPK_VALUES
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, D, Reply, forward, push, serve
from tests.hardening.stacks import OTHER_DEPLOYMENT, CloudModel, build_cloud_model
from tests.support import max_abs_diff

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
MAX_BODY = 256 << 10  # a small P2 limit, so that the 413 path is reachable too
FLOAT = re.compile(r"\d\.\d{3,}|\de[+-]\d")  # how a tensor value would show in text


@dataclass
class P2:
    client: TestClient
    model: CloudModel
    credential: str
    request: bytes  # a valid forward body
    first: bytes  # P2's first answer to it

    def post(self, body: bytes, **query: Any) -> Reply:
        return forward(self.client, self.credential, body, **query)

    def still_serves(self) -> None:
        reply = self.post(self.request)
        assert reply.status_code == 200, reply.text
        assert wire.decode(reply.content)[0][LOGITS].equal(wire.decode(self.first)[0][LOGITS])


@pytest.fixture(scope="module")
def p2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[P2]:
    root = tmp_path_factory.mktemp("fuzz")
    model = build_cloud_model(root)
    with serve(root / "data", max_body_bytes=MAX_BODY) as client:
        for deployment_id in (DEPLOYMENT, OTHER_DEPLOYMENT):
            reply = push(client, *model.push_body(deployment_id), deployment_id=deployment_id)
            assert reply.status_code == 200, reply.text
        credential = model.credential()
        request, expected = model.valid_request()
        first = forward(client, credential, request)
        assert first.status_code == 200, first.text
        assert max_abs_diff(model.logits_of(first.content), expected) <= 1e-4
        yield P2(client, model, credential, request, first.content)


def check(p2: P2, reply: Reply) -> None:
    """A 200 with outputs, or a 4xx in the one shape that leaks nothing; then P2 still serves."""
    assert reply.status_code == 200 or 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    if reply.status_code == 200:
        tensors, _ = wire.decode(reply.content)
        assert set(tensors) in ({LOGITS}, {TOPK_VALUES, "topk_indices"})
    else:
        body = reply.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        code, message = body["error"]["code"], body["error"]["message"]
        assert code in (E_BAD_INPUT, E_TOO_LARGE) and message
        assert p2.credential not in message and PUSH_TOKEN not in message
        assert "tensor(" not in message and not FLOAT.search(message), message
    p2.still_serves()


# --- valid bodies, and their parts --------------------------------------------------------


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kind = seed % 4
    if kind == 0:
        return {INPUTS_EMBEDS: torch.randn(1, 3, D, generator=g)}
    if kind == 1:
        return {INPUTS_EMBEDS: torch.randn(2, 2, D, generator=g).to(torch.bfloat16)}
    if kind == 2:
        return {INPUTS_EMBEDS: torch.randn(1, 2, D, generator=g).to(torch.float16)}
    return {INPUTS_EMBEDS: torch.randn(2, 3, D, generator=g), ATTENTION_MASK: torch.tensor([[1, 1, 1], [0, 1, 1]])}


valid_bodies = st.integers(0, 7).map(lambda seed: wire.encode(_tensors(seed)))


def split(body: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, data region) of a safetensors body."""
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + n]), body[8 + n :]


def join(header: Any, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


options = st.fixed_dictionaries(
    {},
    optional={"output": st.sampled_from(["all", "last", "topk"]), "k": st.integers(1, 70)},
)


# --- bytes ---------------------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=2048), query=options)
def test_random_bytes(p2: P2, body: bytes, query: dict[str, Any]) -> None:
    check(p2, p2.post(body, **query))


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    body = draw(valid_bodies)
    how = draw(st.sampled_from(["flip", "cut", "extend", "length"]))
    if how == "flip":
        i = draw(st.integers(0, len(body) - 1))
        return body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
    if how == "cut":
        return body[: draw(st.integers(0, len(body) - 1))]
    if how == "extend":
        return body + draw(st.binary(min_size=1, max_size=64))
    (n,) = struct.unpack("<Q", body[:8])
    lie = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, n - 16), n + 16).filter(lambda v: v != n)))
    return struct.pack("<Q", lie) + body[8:]


@FUZZ
@given(body=damaged(), query=options)
def test_damaged_bytes(p2: P2, body: bytes, query: dict[str, Any]) -> None:
    check(p2, p2.post(body, **query))


# --- the header ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
sizes = st.one_of(st.integers(-3, 70), st.integers(2**31, 2**66))


@st.composite
def edited_header(draw: st.DrawFn) -> bytes:
    header: Any
    header, data = split(draw(valid_bodies))
    names = [n for n in header if n != "__metadata__"]
    name = draw(st.sampled_from(names))
    entry = header[name]
    edit = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "extra", "drop", "metadata", "whole"]))
    if edit == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "f32", ""]) | json_values)
    elif edit == "shape":
        entry["shape"] = draw(st.lists(sizes, max_size=5) | json_values)
    elif edit == "offsets":
        entry["data_offsets"] = draw(st.lists(sizes, min_size=0, max_size=3) | json_values)
    elif edit == "entry":
        header[name] = draw(json_values)
    elif edit == "extra":
        extra = draw(st.sampled_from(["input_ids", "pi", "pi_c", ATTENTION_MASK, "x"]))
        header[extra] = {"dtype": "I64", "shape": [1, 3], "data_offsets": [len(data), len(data) + 24]}
        data += draw(st.binary(min_size=24, max_size=24))
    elif edit == "drop":
        del header[name]
    elif edit == "metadata":
        header["__metadata__"] = draw(json_values)
    else:
        header = draw(json_values)
    return join(header, data)


@FUZZ
@given(body=edited_header(), query=options)
def test_edited_header(p2: P2, body: bytes, query: dict[str, Any]) -> None:
    check(p2, p2.post(body, **query))


# --- well-formed safetensors, wrong tensors ------------------------------------------------------

wire_dtypes = st.sampled_from(sorted(wire.DTYPES.values(), key=str))


@st.composite
def wrong_tensors(draw: st.DrawFn) -> bytes:
    dims = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    if len(dims) == 3 and draw(st.booleans()):
        dims[2] = D  # the right width, so that the other checks are reached
    dtype = draw(wire_dtypes)
    x = (torch.randn(dims) * 3).to(dtype)
    if x.is_floating_point() and x.numel() and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    tensors = {INPUTS_EMBEDS: x}
    if draw(st.booleans()):
        mask_dims = draw(st.sampled_from([dims[:2], dims[:1], [*dims[:2], 1], []]))
        tensors[ATTENTION_MASK] = torch.randint(-1, 3, mask_dims).to(draw(wire_dtypes))
    return wire.encode(tensors)


@FUZZ
@given(body=wrong_tensors(), query=options)
def test_wrong_tensors(p2: P2, body: bytes, query: dict[str, Any]) -> None:
    check(p2, p2.post(body, **query))


# --- cases found by the fuzzing, kept as regressions -----------------------------------------------


def test_found_inputs(p2: P2) -> None:
    header, data = split(p2.request)
    entry = f'"{INPUTS_EMBEDS}":{{"dtype":"F32","shape":[1,0,{D}],"data_offsets":[0,0]}}'
    for body, status, word in (
        # a header entry whose dtype is a list: `dtype not in DTYPES` raised TypeError (500)
        (join({INPUTS_EMBEDS: dict(header[INPUTS_EMBEDS], dtype=["F32"])}, data), 400, "dtype"),
        # a header nested deeper than Python's recursion limit: json.loads raised RecursionError (500)
        (struct.pack("<Q", 5000) + b"[" * 5000, 400, "JSON"),
        # a header of more than 1 MiB
        (struct.pack("<Q", (1 << 20) + 8) + b" " * ((1 << 20) + 8), 413, "limit"),
        # the same tensor twice
        (join_text("{" + entry + "," + entry + "}", b""), 400, ""),
    ):
        reply = p2.post(body)
        assert reply.status_code == status, reply.text
        assert word.lower() in reply.json()["error"]["message"].lower()
        check(p2, reply)


def join_text(text: str, data: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode() + data
