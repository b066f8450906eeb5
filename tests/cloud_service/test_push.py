"""Weight pushes: streamed, verified, activated atomically, kept on disk, reloaded on restart."""

import functools
import hashlib
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from starlette.requests import ClientDisconnect

from cloud_service.schemas import ActiveRecord
from shared import wire
from shared.api import (
    DIGEST_HEADER,
    E_BAD_INPUT,
    E_CONFLICT,
    E_FORBIDDEN,
    E_KEY_OUTDATED,
    E_NOT_FOUND,
    E_TOO_LARGE,
    E_UNAUTHORIZED,
    KEY_VERSION_HEADER,
    LOGITS,
    PUSH_FAMILY,
    PUSH_VERIFY_KEY,
    DeploymentInfo,
    PushResult,
)
from shared.credentials import Signer
from shared.permutation import unpermute
from tests.cloud_service import helpers
from tests.cloud_service.helpers import CONFIG, DEPLOYMENT, PUSH_TOKEN, D, Deployed, V
from tests.support import max_abs_diff

TOL = 1e-4


def data_files(data: Path) -> list[str]:
    return sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())


def still_serves_v1(client: TestClient, original: transformers.PreTrainedModel, v1: Deployed, credential: str) -> None:
    """Key version 1 is active and answers exactly."""
    info = DeploymentInfo.model_validate_json(client.get(f"/v1/deployments/{DEPLOYMENT}").content)
    assert info.key_version == 1
    ids = torch.randint(0, V, (1, 5))
    tensors, _ = helpers.decoded(
        helpers.forward(client, credential, helpers.embeds(original, ids, v1.pi), output="last", key_version=1)
    )
    with torch.no_grad():
        ref = original(input_ids=ids).logits[:, -1:]
    assert max_abs_diff(unpermute(tensors[LOGITS], v1.pi_c), ref) <= TOL


def test_push_activates_and_info_is_public(tmp_path: Path, v1: Deployed, signer: Signer) -> None:
    data = tmp_path / "data"
    with helpers.serve(data) as client:
        helpers.assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 404, E_NOT_FOUND)
        body, digest = v1.body(signer)
        response = helpers.push(client, body, digest)
        assert response.status_code == 200, response.text
        result = PushResult.model_validate_json(response.content)
        assert result == PushResult(deployment_id=DEPLOYMENT, key_version=1, status="active", sha256=digest)
        info = client.get(f"/v1/deployments/{DEPLOYMENT}")  # no credential needed
        assert info.status_code == 200
        assert DeploymentInfo.model_validate_json(info.content) == DeploymentInfo(
            deployment_id=DEPLOYMENT,
            family="llama",
            d_model=D,
            d_out=V,
            n_layers=CONFIG["num_hidden_layers"],
            key_version=1,
            status="active",
            device="cpu",
            dtype="float32",
            max_positions=CONFIG["max_position_embeddings"],
        )
        assert "verify" not in info.text and signer.public_key not in info.text
    assert data_files(data) == [f"deployments/{DEPLOYMENT}/active.json", f"deployments/{DEPLOYMENT}/v1.safetensors"]
    record = ActiveRecord.model_validate_json((data / "deployments" / DEPLOYMENT / "active.json").read_bytes())
    assert record.key_version == 1 and record.sha256 == digest and record.size == len(body)
    assert (data / "deployments" / DEPLOYMENT / "v1.safetensors").read_bytes() == body


def test_same_version_same_digest_is_idempotent_other_digest_or_older_is_a_conflict(
    tmp_path: Path, v1: Deployed, v2: Deployed, signer: Signer
) -> None:
    with helpers.serve(tmp_path / "data") as client:
        body, digest = v2.body(signer)
        assert helpers.push(client, body, digest).status_code == 200
        again = helpers.push(client, body, digest)
        assert again.status_code == 200 and PushResult.model_validate_json(again.content).sha256 == digest
        other, other_digest = v2.body(signer, extra="x")  # same version, other bytes
        assert "already active" in helpers.assert_error(helpers.push(client, other, other_digest), 409, E_CONFLICT)
        older, older_digest = v1.body(signer)
        assert "older" in helpers.assert_error(helpers.push(client, older, older_digest), 409, E_CONFLICT)
        assert not list((tmp_path / "data" / "tmp").iterdir())


def test_rejected_pushes_leave_the_old_version_serving_and_no_file(
    tmp_path: Path, original: transformers.PreTrainedModel, v1: Deployed, v2: Deployed, signer: Signer, credential: str
) -> None:
    data = tmp_path / "data"
    with helpers.serve(data, max_push_bytes=1 << 20) as client:
        body, digest = v1.body(signer)
        assert helpers.push(client, body, digest).status_code == 200
        before = data_files(data)
        new, new_digest = v2.body(signer)

        helpers.assert_error(helpers.push(client, new, "0" * 64), 400, E_BAD_INPUT)  # wrong digest
        helpers.assert_error(helpers.push(client, new, new_digest[:-1]), 400, E_BAD_INPUT)  # not a digest
        response = client.put(
            f"/v1/deployments/{DEPLOYMENT}/weights", content=new, headers={"Authorization": f"Bearer {PUSH_TOKEN}"}
        )
        assert "X-Stip-Sha256" in helpers.assert_error(response, 400, E_BAD_INPUT)  # no digest
        truncated = new[: len(new) - 1000]  # digest of what arrived: only the header check can tell
        helpers.assert_error(helpers.push(client, truncated, hashlib.sha256(truncated).hexdigest()), 400, E_BAD_INPUT)
        helpers.assert_error(helpers.push(client, new, new_digest, token="wrong-token"), 401, E_UNAUTHORIZED)
        response = helpers.push(client, new, new_digest, token=None)
        helpers.assert_error(response, 401, E_UNAUTHORIZED)
        assert response.headers["www-authenticate"] == "Bearer"
        big = b"\0" * ((1 << 20) + 1)
        helpers.assert_error(helpers.push(client, big, hashlib.sha256(big).hexdigest()), 413, E_TOO_LARGE)
        other_dep, other_digest = v2.body(signer, deployment_id="someone-else")
        assert "someone-else" in helpers.assert_error(helpers.push(client, other_dep, other_digest), 400, E_BAD_INPUT)
        no_key, no_key_digest = v2.body(signer, **{PUSH_VERIFY_KEY: "not-a-key"})
        helpers.assert_error(helpers.push(client, no_key, no_key_digest), 400, E_BAD_INPUT)
        bad_family, bad_family_digest = v2.body(signer, **{PUSH_FAMILY: "t5"})
        helpers.assert_error(
            helpers.push(client, bad_family, bad_family_digest), 422, E_BAD_INPUT
        )  # UnsupportedModel: 422 on both services (stip_http.errors)
        garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"
        helpers.assert_error(helpers.push(client, garbage, hashlib.sha256(garbage).hexdigest()), 400, E_BAD_INPUT)
        helpers.assert_error(helpers.push(client, body, digest, deployment_id=".hidden"), 400, E_BAD_INPUT)
        headers = {"Authorization": f"Bearer {PUSH_TOKEN}", DIGEST_HEADER: new_digest, KEY_VERSION_HEADER: "3"}
        mismatch = client.put(f"/v1/deployments/{DEPLOYMENT}/weights", content=new, headers=headers)
        assert "key version 3" in helpers.assert_error(mismatch, 400, E_BAD_INPUT)

        assert data_files(data) == before  # no temp file, no other version
        still_serves_v1(client, original, v1, credential)


def _push_with_extra_tensor(
    client: TestClient, v1: Deployed, signer: Signer, tmp_path: Path, name: str, tensor: torch.Tensor
) -> str:
    """Push v1's shards plus one more tensor; returns the error message."""
    extra = tmp_path / "extra.safetensors"
    save_file({name: tensor}, str(extra))
    metadata = json.loads(json.dumps(v1.metadata(signer)))
    _, chunks = wire.concat_files([*v1.result.cloud_files, extra], metadata)
    body = b"".join(chunks)
    return helpers.assert_error(helpers.push(client, body, hashlib.sha256(body).hexdigest()), 400, E_BAD_INPUT)


def test_p2_never_accepts_a_permutation_or_the_embedding(
    tmp_path: Path, v1: Deployed, signer: Signer, original: transformers.PreTrainedModel
) -> None:
    with helpers.serve(tmp_path / "data") as client:
        message = _push_with_extra_tensor(client, v1, signer, tmp_path, "pi", v1.pi)
        assert "index tensor" in message and "pi" in message
        embedding = original.get_input_embeddings().weight.detach()  # type: ignore[operator]
        message = _push_with_extra_tensor(client, v1, signer, tmp_path, "model.embed_tokens.weight", embedding)
        assert "embedding" in message
        helpers.assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 404, E_NOT_FOUND)
        assert not list((tmp_path / "data" / "tmp").iterdir())


def test_pushes_are_refused_without_a_configured_token(tmp_path: Path, v1: Deployed, signer: Signer) -> None:
    with helpers.serve(tmp_path / "data", push_token=None) as client:
        body, digest = v1.body(signer)
        assert "PUSH_TOKEN" in helpers.assert_error(helpers.push(client, body, digest), 403, E_FORBIDDEN)


def test_restart_reloads_the_active_deployment_and_cleans_leftovers(
    tmp_path: Path,
    original: transformers.PreTrainedModel,
    v1: Deployed,
    signer: Signer,
    credential: str,
) -> None:
    data = tmp_path / "data"
    with helpers.serving(data, v1, signer):
        pass
    # what a crash could leave: a partial push, a version that never became active, a half-written record
    (data / "tmp" / "push-dead.partial").write_bytes(b"partial")
    (data / "deployments" / DEPLOYMENT / "v7.safetensors").write_bytes(b"never active")
    (data / "deployments" / DEPLOYMENT / "active.json.tmp").write_text("{")
    (data / "deployments" / "orphan").mkdir()
    (data / "deployments" / "orphan" / "v1.safetensors").write_bytes(b"never active")
    with helpers.serve(data) as client:
        still_serves_v1(client, original, v1, credential)
    assert data_files(data) == [f"deployments/{DEPLOYMENT}/active.json", f"deployments/{DEPLOYMENT}/v1.safetensors"]


def test_a_corrupt_version_file_is_skipped_on_restart(tmp_path: Path, v1: Deployed, signer: Signer) -> None:
    data = tmp_path / "data"
    with helpers.serve(data) as client:
        body, digest = v1.body(signer)
        assert helpers.push(client, body, digest).status_code == 200
    path = data / "deployments" / DEPLOYMENT / "v1.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"{}" + b"\0" * (len(body) - 10))  # same size, wrong content
    with helpers.serve(data) as client:  # ready all the same; the deployment waits for a new push
        helpers.assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 404, E_NOT_FOUND)
        assert helpers.push(client, body, digest).status_code == 200
        assert client.get(f"/v1/deployments/{DEPLOYMENT}").status_code == 200


def test_rotation_gives_key_outdated_to_old_clients_and_sessions(
    tmp_path: Path, original: transformers.PreTrainedModel, v1: Deployed, v2: Deployed, signer: Signer, credential: str
) -> None:
    data = tmp_path / "data"
    auth = {"Authorization": f"Bearer {credential}"}
    with helpers.serving(data, v1, signer) as client:
        session = client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth).json()["session_id"]
        ids = torch.randint(0, V, (1, 4))
        helpers.decoded(helpers.forward(client, credential, helpers.embeds(original, ids, v1.pi), session_id=session))

        body2, digest2 = v2.body(signer)
        assert helpers.push(client, body2, digest2).status_code == 200
        assert data_files(data) == [
            f"deployments/{DEPLOYMENT}/active.json",
            f"deployments/{DEPLOYMENT}/v2.safetensors",
        ]
        old = helpers.forward(client, credential, helpers.embeds(original, ids, v1.pi), key_version=1)
        assert "key version 2" in helpers.assert_error(old, 409, E_KEY_OUTDATED)
        step = helpers.forward(client, credential, helpers.embeds(original, ids[:, :1], v2.pi), session_id=session)
        helpers.assert_error(step, 409, E_KEY_OUTDATED)
        stale = client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=auth | {"X-Stip-Key-Version": "1"})
        helpers.assert_error(stale, 409, E_KEY_OUTDATED)

        tensors, meta = helpers.decoded(
            helpers.forward(client, credential, helpers.embeds(original, ids, v2.pi), key_version=2)
        )
        with torch.no_grad():
            ref = original(input_ids=ids).logits
        assert meta["key_version"] == "2"
        assert max_abs_diff(unpermute(tensors[LOGITS], v2.pi_c), ref) <= TOL
        assert client.delete(f"/v1/sessions/{session}", headers=auth).status_code == 204
    with helpers.serve(data) as client:
        info = DeploymentInfo.model_validate_json(client.get(f"/v1/deployments/{DEPLOYMENT}").content)
        assert info.key_version == 2


def test_a_push_cut_off_midway_leaves_nothing(
    tmp_path: Path, original: transformers.PreTrainedModel, v1: Deployed, v2: Deployed, signer: Signer, credential: str
) -> None:
    """The connection drops in the middle of the body: the temp file goes, v1 keeps serving."""
    data = tmp_path / "data"
    with helpers.serving(data, v1, signer) as client:
        before = data_files(data)
        new, new_digest = v2.body(signer)

        async def cut_off() -> AsyncIterator[bytes]:
            yield new[: len(new) // 2]
            raise ClientDisconnect()

        service = client.app.state.service  # type: ignore[attr-defined]
        call = functools.partial(service.push, DEPLOYMENT, cut_off(), digest=new_digest, content_length=len(new))
        with pytest.raises(ClientDisconnect):
            client.portal.call(call)  # type: ignore[union-attr]
        assert data_files(data) == before
        still_serves_v1(client, original, v1, credential)
