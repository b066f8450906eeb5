"""P2's forward pass: exact against the stock original model, with and without a session."""

from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from shared import api, wire
from shared.credentials import Signer
from shared.permutation import permute, unpermute
from tests.cloud_service import helpers
from tests.cloud_service.helpers import DEPLOYMENT, D, Deployed, V
from tests.shared.encoder_models import tiny_bert
from tests.support import max_abs_diff

TOL = 1e-4


def reference(
    original: transformers.PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The stock original model's logits (B, S, V), positions as generate() counts them."""
    with torch.no_grad():
        if mask is None:
            return original(input_ids=ids).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return original(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def test_forward_all_matches_the_original(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str
) -> None:
    ids = torch.randint(0, V, (2, 7))
    ref = reference(original, ids)
    assert 0.5 < float(ref.abs().max()) < 50  # logits of order 1-10: the tolerance means something
    tensors, meta = helpers.decoded(
        helpers.forward(deployed, credential, helpers.embeds(original, ids, v1.pi), output="all")
    )
    assert set(tensors) == {api.LOGITS} and tensors[api.LOGITS].shape == (2, 7, V)
    assert tensors[api.LOGITS].dtype == torch.float32
    assert max_abs_diff(unpermute(tensors[api.LOGITS], v1.pi_c), ref) <= TOL
    # the output is permuted: without π_c it is not the plaintext
    assert max_abs_diff(tensors[api.LOGITS], ref) > 0.1
    assert meta == {
        api.META_DEPLOYMENT: DEPLOYMENT,
        api.META_KEY_VERSION: "1",
        api.META_SESSION_LENGTH: "7",
        api.META_DTYPE: "float32",  # P2's compute dtype: the SDK sends x·π in it when it is half precision
    }


def test_forward_default_is_all_and_last_is_the_last_position(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str
) -> None:
    ids = torch.randint(0, V, (3, 5))
    ref = reference(original, ids)
    full, _ = helpers.decoded(helpers.forward(deployed, credential, helpers.embeds(original, ids, v1.pi)))
    assert full[api.LOGITS].shape == (3, 5, V)
    response = helpers.forward(deployed, credential, helpers.embeds(original, ids, v1.pi), output="last", key_version=1)
    assert response.headers[api.KEY_VERSION_HEADER] == "1"
    last, _ = helpers.decoded(response)
    assert last[api.LOGITS].shape == (3, 1, V)
    assert max_abs_diff(unpermute(last[api.LOGITS], v1.pi_c), ref[:, -1:]) <= TOL


@pytest.mark.parametrize("k", [5, 1])  # k=1 (greedy decoding) is a max on P2, not a topk
def test_forward_topk_indices_map_to_the_true_top_tokens(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str, k: int
) -> None:
    ids = torch.randint(0, V, (2, 6))
    ref = reference(original, ids)[:, -1:]  # (B, 1, V)
    tensors, _ = helpers.decoded(
        helpers.forward(deployed, credential, helpers.embeds(original, ids, v1.pi), output="topk", k=k)
    )
    assert set(tensors) == {api.TOPK_VALUES, api.TOPK_INDICES}
    values, indices = tensors[api.TOPK_VALUES], tensors[api.TOPK_INDICES]
    assert values.shape == indices.shape == (2, 1, k) and indices.dtype == torch.int64
    true = torch.topk(ref, k, dim=-1)
    assert torch.equal(v1.pi_c[indices], true.indices)  # the token is pi_c[index]
    assert max_abs_diff(values, true.values) <= TOL


def test_forward_with_padding_mask(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str
) -> None:
    ids = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ref = reference(original, ids, mask)
    tensors = helpers.embeds(original, ids, v1.pi) | {api.ATTENTION_MASK: mask}
    got, _ = helpers.decoded(helpers.forward(deployed, credential, tensors, output="all"))
    real = mask.bool()
    assert max_abs_diff(unpermute(got[api.LOGITS], v1.pi_c)[real], ref[real]) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_in_the_request_dtype(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str, dtype: torch.dtype
) -> None:
    ids = torch.randint(0, V, (1, 4))
    x = helpers.embeds(original, ids, v1.pi)[api.INPUTS_EMBEDS].to(dtype)
    tensors, _ = helpers.decoded(helpers.forward(deployed, credential, {api.INPUTS_EMBEDS: x}, output="last"))
    assert tensors[api.LOGITS].dtype == dtype
    ref = reference(original, ids)[:, -1:]
    assert max_abs_diff(unpermute(tensors[api.LOGITS], v1.pi_c), ref) < 0.25  # rounding of the inputs and outputs


def new_session(client: TestClient, credential: str) -> str:
    response = client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers={"Authorization": f"Bearer {credential}"})
    assert response.status_code == 201, response.text
    created = api.SessionCreated.model_validate_json(response.content)
    assert created.deployment_id == DEPLOYMENT and created.key_version == 1 and created.idle_ttl_s > 0
    return created.session_id


@pytest.mark.parametrize("padded", [False, True])
def test_session_cache_equals_the_full_forward(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str, padded: bool
) -> None:
    """A prefill then single-token steps on P2's KV cache give the no-cache logits."""
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[0, :3] = 0  # left padding, as generate() pads a batch
    ref = reference(original, ids, mask)
    stateless, _ = helpers.decoded(
        helpers.forward(
            deployed, credential, helpers.embeds(original, ids, v1.pi) | {api.ATTENTION_MASK: mask}, output="all"
        )
    )
    session = new_session(deployed, credential)
    prefill = 5
    first = helpers.embeds(original, ids[:, :prefill], v1.pi) | {api.ATTENTION_MASK: mask[:, :prefill]}
    tensors, meta = helpers.decoded(helpers.forward(deployed, credential, first, session_id=session, output="all"))
    assert meta[api.META_SESSION_LENGTH] == str(prefill)
    steps = [tensors[api.LOGITS]]
    for t in range(prefill, 9):  # one new row per step; the mask sent covers the new token only
        step = helpers.embeds(original, ids[:, t : t + 1], v1.pi) | {api.ATTENTION_MASK: mask[:, t : t + 1]}
        tensors, meta = helpers.decoded(helpers.forward(deployed, credential, step, session_id=session, output="last"))
        assert meta[api.META_SESSION_LENGTH] == str(t + 1)
        steps.append(tensors[api.LOGITS])
    got = unpermute(torch.cat(steps, dim=1), v1.pi_c)
    real = mask.bool()
    assert max_abs_diff(got[real], ref[real]) <= TOL
    assert max_abs_diff(got[real], unpermute(stateless[api.LOGITS], v1.pi_c)[real]) <= TOL


def test_session_without_mask_and_topk(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str
) -> None:
    ids = torch.randint(0, V, (1, 6))
    ref = reference(original, ids)
    session = new_session(deployed, credential)
    helpers.decoded(
        helpers.forward(deployed, credential, helpers.embeds(original, ids[:, :4], v1.pi), session_id=session)
    )
    helpers.decoded(
        helpers.forward(deployed, credential, helpers.embeds(original, ids[:, 4:5], v1.pi), session_id=session)
    )
    tensors, meta = helpers.decoded(
        helpers.forward(
            deployed, credential, helpers.embeds(original, ids[:, 5:], v1.pi), session_id=session, output="topk", k=3
        )
    )
    assert meta[api.META_SESSION_LENGTH] == "6"
    assert torch.equal(v1.pi_c[tensors[api.TOPK_INDICES]], torch.topk(ref[:, -1:], 3, dim=-1).indices)


def test_response_is_safetensors_with_metadata_only_strings(
    deployed: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str
) -> None:
    ids = torch.randint(0, V, (1, 3))
    response = helpers.forward(deployed, credential, helpers.embeds(original, ids, v1.pi), output="last")
    infos, meta, _ = wire.parse_header(response.content, body_size=len(response.content))
    assert set(infos) == {api.LOGITS} and all(isinstance(v, str) for v in meta.values())


def test_encoder_returns_hidden_states_and_pooled(tmp_path: Path, signer: Signer) -> None:
    """BERT: hidden states and pooled output permuted by π; no logits, no top-k, no sessions."""
    bert, _ = tiny_bert(seed=2, vocab=50, positions=16)  # d = 4 heads x 8 = D
    bert.save_pretrained(tmp_path / "bert")
    encoder = Deployed.transform(tmp_path / "bert", tmp_path / "out", 1)
    token, _ = signer.issue(subject="alice", deployment_id="bert", ttl_s=600)
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask)
        x = bert.embeddings(input_ids=ids)  # the user side's embedding module
    tensors = {api.INPUTS_EMBEDS: permute(x, encoder.pi), api.ATTENTION_MASK: mask}
    with helpers.serving(tmp_path / "data", encoder, signer, deployment_id="bert") as client:
        got, meta = helpers.decoded(helpers.forward(client, token, tensors, deployment_id="bert"))
        assert set(got) == {api.HIDDEN_STATES, api.POOLED} and meta[api.META_SESSION_LENGTH] == "6"
        real = mask.bool()
        assert max_abs_diff(unpermute(got[api.HIDDEN_STATES], encoder.pi)[real], ref.last_hidden_state[real]) <= TOL
        assert max_abs_diff(unpermute(got[api.POOLED], encoder.pi), ref.pooler_output) <= TOL
        last, _ = helpers.decoded(helpers.forward(client, token, tensors, deployment_id="bert", output="last"))
        assert last[api.HIDDEN_STATES].shape == (2, 1, D)
        topk = helpers.forward(client, token, tensors, deployment_id="bert", output="topk", k=2)
        assert "topk" in helpers.assert_error(topk, 400, api.E_BAD_INPUT)
        sessions = client.post("/v1/deployments/bert/sessions", headers={"Authorization": f"Bearer {token}"})
        assert "KV cache" in helpers.assert_error(sessions, 400, api.E_BAD_INPUT)
