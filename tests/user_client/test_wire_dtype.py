"""The SDK sends x·π in P2's dtype once P2 has named it (half-precision transport)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import torch

from shared import api, wire
from tests.user_client.conftest import VOCAB
from user_client import StipClient

IDS = [[101, 2023, 2003, 102]]


def test_inputs_travel_in_p2s_half_precision_after_the_first_answer(make_client: Callable[..., StipClient]) -> None:
    sent: list[torch.dtype] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tensors, _ = wire.decode(request.read())
        x = tensors[api.INPUTS_EMBEDS]
        sent.append(x.dtype)
        version = request.headers[api.KEY_VERSION_HEADER]
        meta = {api.META_DEPLOYMENT: "llama", api.META_KEY_VERSION: version, api.META_DTYPE: "float16"}
        logits = torch.zeros(x.shape[0], x.shape[1], VOCAB, dtype=torch.float16)
        return httpx.Response(200, content=wire.encode({api.LOGITS: logits}, meta))

    client = make_client(cloud_url="http://mock.test", cloud_transport=httpx.MockTransport(handler))
    first, second = client.forward(IDS), client.forward(IDS)
    assert sent == [torch.float32, torch.float16]  # fp32 until P2 said it computes in fp16
    assert first.dtype == second.dtype == torch.float32 and first.shape == (1, 4, VOCAB)
