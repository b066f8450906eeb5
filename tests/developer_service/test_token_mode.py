"""P1 and token mode: off unless the operator enables it, decoders only, and what it pushes."""

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from shared import api
from shared.keys import UserKey
from tests.developer_service.conftest import CLOUD_URL, admin, bearer, issue, manifest, register, untar, wait


def _create(client, model_dir: Path, mode: str | None):  # type: ignore[no-untyped-def]
    body = {"model_id": register(client, model_dir)["model_id"], "cloud_url": CLOUD_URL}
    if mode is not None:
        body["mode"] = mode
    return client.post("/v1/deployments", json=body, headers=admin())


def test_token_mode_is_refused_unless_the_operator_enables_it(p1, model_dir: Path, cloud) -> None:
    with p1() as client:
        r = _create(client, model_dir, "token")
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == api.E_FORBIDDEN
        assert "STIP_DEVELOPER_ALLOW_TOKEN_MODE=true" in r.json()["error"]["message"]
        assert client.get("/v1/deployments", headers=admin()).json() == []
        assert _create(client, model_dir, "bogus").status_code == 422
        r = _create(client, model_dir, None)  # the default: embeds mode
        status = wait(client, r.json()["deployment_id"])
        assert status["mode"] == "embeds"
    [push] = cloud.pushes
    assert api.PUSH_MODE not in push.metadata and "model.embed_tokens.weight" not in push.tensors


def test_token_mode_needs_a_decoder(p1, tmp_path: Path) -> None:
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    bert.config.architectures = ["BertModel"]
    bert.save_pretrained(tmp_path / "bert")
    with p1(allow_token_mode=True) as client:
        r = _create(client, tmp_path / "bert", "token")
        assert r.status_code == 422, r.text
        assert "token mode needs a decoder" in r.json()["error"]["message"]


def test_token_mode_pushes_the_permuted_token_table(p1, llama, cloud, tmp_path: Path) -> None:
    model_dir, original = llama
    with p1(allow_token_mode=True) as client:
        r = _create(client, model_dir, "token")
        assert r.status_code == 202, r.text
        dep_id = r.json()["deployment_id"]
        status = wait(client, dep_id)
        assert status["status"] == "active" and status["mode"] == "token", status
        bundle = untar(client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(issue(client, dep_id))).content)
        assert manifest(bundle)["mode"] == "token"
        assert client.post(f"/v1/deployments/{dep_id}/rotate", headers=admin()).status_code == 202
        assert wait(client, dep_id)["key_version"] == 2

    first, rotated = cloud.pushes
    assert first.metadata[api.PUSH_MODE] == rotated.metadata[api.PUSH_MODE] == "token"  # kept across rotations
    (tmp_path / "key.safetensors").write_bytes(bundle["key.safetensors"][1])
    key = UserKey.load(tmp_path / "key.safetensors")
    table = original.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(first.tensors["model.embed_tokens.weight"], table[key.pi_c][:, key.pi])  # E′ = E[π_c][:, π]
    assert not torch.equal(rotated.tensors["model.embed_tokens.weight"], first.tensors["model.embed_tokens.weight"])
    (tmp_path / "embedding.safetensors").write_bytes(bundle["embedding.safetensors"][1])
    assert torch.equal(load_file(str(tmp_path / "embedding.safetensors"))["model.embed_tokens.weight"], table)
