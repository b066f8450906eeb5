"""P1 over HTTP, with a fake P2: registry, deploy, user bundle, rotation, credentials, restart."""

import json
import os
import stat
import threading
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from shared import api
from shared.checkpoint import transform_model_dir
from shared.credentials import Signer
from shared.families import get_family
from shared.keys import DeveloperKey, UserKey
from shared.permutation import permute, unpermute
from tests.developer_service.conftest import (
    ADMIN,
    CLOUD_URL,
    LLAMA,
    PUSH,
    admin,
    bearer,
    deploy,
    issue,
    manifest,
    register,
    untar,
    wait,
)


def _error(r, status: int, code: str, match: str = "") -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code
    assert match.lower() in body["error"]["message"].lower(), body
    return str(body["error"]["message"])


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- registry ----------------------------------------------------------------------------------


def test_register_list_get_and_idempotence(p1, model_dir: Path) -> None:
    with p1() as client:
        r = client.post("/v1/models", json={"path": str(model_dir), "name": "tiny"}, headers=admin())
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["family"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
        assert (info["d_model"], info["d_out"], info["n_layers"]) == (32, 61, 2)
        assert info["path"] == str(model_dir.resolve()) and info["name"] == "tiny"
        again = client.post("/v1/models", json={"path": str(model_dir), "name": "tiny"}, headers=admin())
        assert again.status_code == 200 and again.json()["model_id"] == info["model_id"]
        assert [m["model_id"] for m in client.get("/v1/models", headers=admin()).json()] == [info["model_id"]]
        assert client.get(f"/v1/models/{info['model_id']}", headers=admin()).json() == info
        _error(client.get("/v1/models/m-nope", headers=admin()), 404, api.E_NOT_FOUND, "m-nope")


def test_register_refuses_bad_directories_clearly(p1, model_dir: Path, tmp_path: Path) -> None:
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    (mamba / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(LLAMA))
    with p1() as client:

        def post(body: object):
            return client.post("/v1/models", json=body, headers=admin())

        _error(post({"path": str(no_config)}), 400, api.E_BAD_INPUT, "no config.json")
        message = _error(post({"path": str(mamba)}), 422, api.E_BAD_INPUT, "unsupported architecture")
        assert "MambaForCausalLM" in message and "LlamaForCausalLM" in message
        _error(post({"path": str(no_weights)}), 400, api.E_BAD_INPUT, "neither model.safetensors")
        _error(post({"path": str(tmp_path / "absent")}), 400, api.E_BAD_INPUT, "absent does not exist on P1's machine")
        _error(post({"path": str(mamba / "config.json")}), 400, api.E_BAD_INPUT, "config.json is not a directory")
        _error(post({"path": "relative/dir"}), 400, api.E_BAD_INPUT, "absolute")
        _error(post({"name": "x"}), 422, api.E_BAD_INPUT, "path")
        r = client.post("/v1/models", content=b"{not json", headers={**admin(), "Content-Type": "application/json"})
        _error(r, 422, api.E_BAD_INPUT)
        assert client.get("/v1/models", headers=admin()).json() == []


# --- deploy and the user bundle ---------------------------------------------------------------------


def test_deploy_pushes_exactly_theta_prime(p1, llama, cloud, tmp_path: Path) -> None:
    model_dir, original = llama
    with p1() as client:
        status = deploy(client, model_dir)
        assert status["status"] == "active" and status["key_version"] == 1, status
        assert status["pending_key_version"] is None and status["error"] is None
        assert status["progress"]["stage"] == "done" and status["progress"]["done"] > 0
        assert status["cloud_url"] == CLOUD_URL
        dep_id = status["deployment_id"]
        bundle = untar(client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(issue(client, dep_id))).content)
        verify_key = client.app.state.service.signer.public_key

    [push] = cloud.pushes
    assert push.headers["authorization"] == f"Bearer {PUSH}"
    assert push.metadata[api.PUSH_DEPLOYMENT] == dep_id and push.metadata[api.PUSH_FAMILY] == "llama"
    assert push.metadata[api.PUSH_KEY_VERSION] == "1" and push.metadata[api.PUSH_VERIFY_KEY] == verify_key
    cloud_config = json.loads(push.metadata[api.PUSH_CONFIG])
    assert cloud_config["hidden_size"] == 32 and cloud_config["tie_word_embeddings"] is False

    # θ′ and nothing else: every cloud shard tensor, no embedding module, no index vector.
    cloud_dir = tmp_path / "data" / "deployments" / dep_id / "v1" / "cloud"
    shards = sorted(cloud_dir.glob("*.safetensors"))
    assert len(shards) > 1  # the push concatenated several shards into one body
    on_disk: dict[str, torch.Tensor] = {}
    for f in shards:
        on_disk.update(load_file(str(f)))
    assert set(push.tensors) == set(on_disk)
    assert all(torch.equal(push.tensors[n], on_disk[n]) for n in on_disk)
    assert "model.embed_tokens.weight" not in push.tensors
    assert not {"pi", "pi_c"} & set(push.tensors) and not any(n.startswith("layers.") for n in push.tensors)
    assert all(t.dtype.is_floating_point for t in push.tensors.values())
    state = original.state_dict()
    assert not torch.equal(
        push.tensors["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    )

    # Lossless: the stock class on the pushed θ′, fed x·π from the bundle, gives the original logits.
    key_path = tmp_path / "key.safetensors"
    key_path.write_bytes(bundle["key.safetensors"][1])
    emb_path = tmp_path / "embedding.safetensors"
    emb_path.write_bytes(bundle["embedding.safetensors"][1])
    key = UserKey.load(key_path)
    stock = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cloud_config)).eval()
    missing, unexpected = stock.load_state_dict(push.tensors, strict=False)
    assert missing == ["model.embed_tokens.weight"] and unexpected == []
    ids = torch.randint(0, 61, (2, 7))
    x = permute(get_family("llama").embed(load_file(str(emb_path)), LLAMA, ids), key.pi)
    with torch.no_grad():
        got = unpermute(stock(inputs_embeds=x).logits, key.pi_c)
        ref = original(ids).logits
    assert (got - ref).abs().max() <= 1e-4


def test_user_key_is_a_tar_of_the_user_dir(p1, model_dir: Path, tmp_path: Path) -> None:
    with p1(public_cloud_url="https://cloud.example/") as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        r = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(issue(client, dep_id)))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content) and r.headers["cache-control"] == "no-store"
    files = untar(r.content)
    user_dir = tmp_path / "data" / "deployments" / dep_id / "v1" / "user"
    expected = {p.relative_to(user_dir).as_posix() for p in user_dir.rglob("*")}
    assert set(files) == expected
    assert {"key.safetensors", "embedding.safetensors", "config.json", "tokenizer.json", "stip.json"} <= set(files)
    assert all(info.mode == 0o600 for info, _ in files.values())
    for name, (_, data) in files.items():
        if name != "stip.json":
            assert data == (user_dir / name).read_bytes(), name
    key_path = tmp_path / "key.safetensors"
    key_path.write_bytes(files["key.safetensors"][1])
    key = UserKey.load(key_path)
    m = manifest(files)
    assert r.headers[api.FINGERPRINT_HEADER] == key.fingerprint == m["fingerprint"]
    assert r.headers[api.KEY_VERSION_HEADER] == "1" == str(m["key_version"]) == str(key.key_version)
    assert m["deployment_id"] == dep_id and m["cloud_url"] == "https://cloud.example"
    api.BundleManifest.model_validate(m)
    # the developer key never leaves P1, and matches what users hold
    dev = DeveloperKey.load(tmp_path / "data" / "deployments" / dep_id / "v1" / "developer" / "key.safetensors")
    assert dev.user.fingerprint == key.fingerprint
    assert not any("developer" in name for name in files)


def test_key_material_and_state_are_owner_only(p1, model_dir: Path, tmp_path: Path) -> None:
    with p1() as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        token = issue(client, dep_id)
    data = tmp_path / "data"
    version = data / "deployments" / dep_id / "v1"
    assert _mode(data) == 0o700
    for path in (
        data / "signing.key",
        data / "state.json",
        version / "developer" / "key.safetensors",
        version / "user" / "key.safetensors",
    ):
        assert _mode(path) == 0o600, path
    assert _mode(version / "developer") == 0o700
    # P1 stores a hash of the credential, never the token itself
    state = (data / "state.json").read_text()
    assert token not in state and token.split(".")[2] not in state and ADMIN not in state and PUSH not in state


def test_user_key_before_activation_is_a_conflict(p1, model_dir: Path, cloud) -> None:
    cloud.fail_with = 401
    with p1() as client:
        status = deploy(client, model_dir)
        assert status["status"] == "failed" and status["key_version"] is None
        assert "401" in status["error"] and "fake cloud refuses" in status["error"]
        # a refused push token: the fix is to make P1's and P2's tokens equal
        assert "STIP_DEVELOPER_PUSH_TOKEN" in status["error"] and "STIP_CLOUD_PUSH_TOKEN" in status["error"]
        assert status["progress"]["stage"] == "failed"
        dep_id = status["deployment_id"]
        r = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(issue(client, dep_id)))
        _error(r, 409, api.E_CONFLICT, "no active key version")
        # retry with a rotate once P2 accepts: versions are never reused
        cloud.fail_with = None
        client.post(f"/v1/deployments/{dep_id}/rotate", headers=admin())
        status = wait(client, dep_id)
        assert status["status"] == "active" and status["key_version"] == 2 and status["error"] is None
        r = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(issue(client, dep_id)))
        assert r.status_code == 200 and r.headers[api.KEY_VERSION_HEADER] == "2"


def test_create_deployment_checks_its_input(p1, model_dir: Path) -> None:
    with p1() as client:
        model_id = register(client, model_dir)["model_id"]

        def post(body: dict):
            return client.post("/v1/deployments", json=body, headers=admin())

        _error(post({"model_id": "m-nope", "cloud_url": CLOUD_URL}), 404, api.E_NOT_FOUND, "m-nope")
        _error(post({"model_id": model_id, "cloud_url": "ftp://x"}), 400, api.E_BAD_INPUT, "http(s)")
        _error(post({"model_id": model_id, "cloud_url": "cloud:8002"}), 400, api.E_BAD_INPUT)
        _error(post({"model_id": model_id}), 422, api.E_BAD_INPUT, "cloud_url")
        assert client.get("/v1/deployments", headers=admin()).json() == []
        _error(client.get("/v1/deployments/dep-nope", headers=admin()), 404, api.E_NOT_FOUND)
    with p1(push_token=None) as client:
        _error(post({"model_id": model_id, "cloud_url": CLOUD_URL}), 503, api.E_NOT_READY, "push token")


# --- progress ------------------------------------------------------------------------------------

STAGES = ["queued", "transforming", "pushing", "loading", "done"]


def test_the_job_reports_p2_loading_theta_prime_in_tensor_bytes_then_done(p1, model_dir: Path, cloud) -> None:
    """After the last byte P1 reports `loading` until P2 answers: the tensor bytes P2 says it has
    loaded, of all of θ′'s (P1's own count until P2 reports); the job then ends `done`."""
    cloud.gate = threading.Event()
    with p1() as client:
        model = register(client, model_dir)
        r = client.post(
            "/v1/deployments", json={"model_id": model["model_id"], "cloud_url": CLOUD_URL}, headers=admin()
        )
        dep_id = r.json()["deployment_id"]
        seen: list[str] = []

        def progress_becomes(check) -> dict:
            deadline = time.monotonic() + 60
            while True:
                progress = client.get(f"/v1/deployments/{dep_id}", headers=admin()).json()["progress"]
                if not seen or seen[-1] != progress["stage"]:
                    seen.append(progress["stage"])
                if check(progress):
                    return progress
                assert time.monotonic() < deadline, progress
                time.sleep(0.02)

        before_p2_reports = progress_becomes(lambda p: p["stage"] == "loading")
        cloud.load_report = (300, 1000)
        assert progress_becomes(lambda p: (p["done"], p["total"]) == (300, 1000))["stage"] == "loading"
        cloud.gate.set()
        final = progress_becomes(lambda p: p["stage"] != "loading")
    pushed = cloud.pushes[-1]
    assert before_p2_reports["done"] == 0
    assert before_p2_reports["total"] == sum(t.numel() * t.element_size() for t in pushed.tensors.values())
    assert final == {"stage": "done", "done": int(pushed.headers["content-length"]), "total": final["total"]}
    assert final["total"] == final["done"]  # the bytes pushed
    assert seen == [s for s in STAGES if s in seen] and seen[-2:] == ["loading", "done"]  # in order


# --- rotation ------------------------------------------------------------------------------------


def test_rotate_serves_the_old_version_until_p2_activates_the_new(p1, model_dir: Path, cloud, tmp_path: Path) -> None:
    with p1() as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        token = issue(client, dep_id)
        before = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token))
        fp1 = before.headers[api.FINGERPRINT_HEADER]

        cloud.gate, cloud.pushing = threading.Event(), threading.Event()
        r = client.post(f"/v1/deployments/{dep_id}/rotate", headers=admin())
        assert r.status_code == 202 and r.json()["pending_key_version"] == 2
        assert cloud.pushing.wait(30)
        during = client.get(f"/v1/deployments/{dep_id}", headers=admin()).json()
        assert during["status"] == "rotating" and during["key_version"] == 1 and during["pending_key_version"] == 2
        # the whole body is out, P2 holds the answer: P1 reports P2 loading θ′ (in tensor bytes)
        assert during["progress"]["stage"] == "loading" and during["progress"]["total"] > 0
        held = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token))
        assert held.headers[api.KEY_VERSION_HEADER] == "1" and held.headers[api.FINGERPRINT_HEADER] == fp1
        _error(client.post(f"/v1/deployments/{dep_id}/rotate", headers=admin()), 409, api.E_CONFLICT, "running")
        cloud.gate.set()

        after = wait(client, dep_id)
        assert after["status"] == "active" and after["key_version"] == 2 and after["pending_key_version"] is None
        r = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token))
        assert r.headers[api.KEY_VERSION_HEADER] == "2" and r.headers[api.FINGERPRINT_HEADER] != fp1
        files = untar(r.content)
        assert (
            manifest(files)["key_version"] == 2
            and files["key.safetensors"][1] != untar(before.content)["key.safetensors"][1]
        )
    assert [p.metadata[api.PUSH_KEY_VERSION] for p in cloud.pushes] == ["1", "2"]
    first, second = (p.tensors["model.layers.0.self_attn.o_proj.weight"] for p in cloud.pushes)
    assert not torch.equal(first, second)  # a new θ′, not a re-push
    assert sorted(p.name for p in (tmp_path / "data" / "deployments" / dep_id).iterdir()) == ["v2"]


def test_failed_rotation_keeps_the_active_version(p1, model_dir: Path, cloud, tmp_path: Path) -> None:
    with p1() as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        token = issue(client, dep_id)
        fp1 = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token)).headers[api.FINGERPRINT_HEADER]
        cloud.fail_with = 400
        client.post(f"/v1/deployments/{dep_id}/rotate", headers=admin())
        status = wait(client, dep_id)
        assert status["status"] == "active" and status["key_version"] == 1 and status["pending_key_version"] is None
        assert "rotation to key version 2 failed" in status["error"] and "HTTP 400" in status["error"]
        r = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token))
        assert r.headers[api.KEY_VERSION_HEADER] == "1" and r.headers[api.FINGERPRINT_HEADER] == fp1
    assert sorted(p.name for p in (tmp_path / "data" / "deployments" / dep_id).iterdir()) == ["v1"]


# --- credentials -----------------------------------------------------------------------------------


def test_user_key_refuses_every_wrong_credential(p1, model_dir: Path) -> None:
    with p1() as client:
        dep_a = deploy(client, model_dir)["deployment_id"]
        dep_b = deploy(client, model_dir)["deployment_id"]
        token_a, token_b = issue(client, dep_a, name="alice"), issue(client, dep_b, name="bob")
        url = f"/v1/deployments/{dep_a}/user-key"
        assert client.get(url, headers=bearer(token_a)).status_code == 200

        r = client.get(url)
        _error(r, 401, api.E_UNAUTHORIZED, "missing")
        assert r.headers["www-authenticate"] == "Bearer"
        _error(client.get(url, headers={"Authorization": f"Basic {token_a}"}), 401, api.E_UNAUTHORIZED)
        _error(client.get(url, headers=bearer("not-a-credential")), 401, api.E_UNAUTHORIZED)
        message = _error(client.get(url, headers=bearer(token_b)), 403, api.E_FORBIDDEN, "another deployment")
        assert dep_b in message and f"stip-developer issue-credential {dep_a}" in message  # the one it is for, the fix
        _error(client.get(url, headers=bearer(ADMIN)), 401, api.E_UNAUTHORIZED)
        _error(client.get(url, headers=bearer(PUSH)), 401, api.E_UNAUTHORIZED)
        forged, _ = Signer.generate().issue(subject="mallory", deployment_id=dep_a, ttl_s=60)
        _error(client.get(url, headers=bearer(forged)), 401, api.E_UNAUTHORIZED)
        tampered = token_a[:-10] + ("A" if token_a[-10] != "A" else "B") + token_a[-9:]  # a full 6-bit character
        _error(client.get(url, headers=bearer(tampered)), 401, api.E_UNAUTHORIZED)
        # the admin API refuses user credentials, other tokens and no token
        for headers in ({}, bearer(token_a), bearer(PUSH), bearer(ADMIN + "x")):
            _error(client.get("/v1/deployments", headers=headers), 401, api.E_UNAUTHORIZED)
            _error(client.post(f"/v1/deployments/{dep_a}/users", json={}, headers=headers), 401, api.E_UNAUTHORIZED)

        # listing shows claims, never tokens; revoking stops the key handout
        listed = client.get(f"/v1/deployments/{dep_a}/users", headers=admin()).json()
        assert [(c["name"], c["revoked"]) for c in listed] == [("alice", False)]
        assert token_a not in json.dumps(listed)
        user_id = listed[0]["user_id"]
        revoked = client.delete(f"/v1/deployments/{dep_a}/users/{user_id}", headers=admin()).json()
        assert revoked["revoked"] is True
        _error(client.get(url, headers=bearer(token_a)), 401, api.E_UNAUTHORIZED, "revoked")
        _error(client.delete(f"/v1/deployments/{dep_b}/users/{user_id}", headers=admin()), 404, api.E_NOT_FOUND)
        _error(client.post("/v1/deployments/dep-nope/users", json={}, headers=admin()), 404, api.E_NOT_FOUND)


def test_expired_credential_is_refused(p1, model_dir: Path) -> None:
    with p1() as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        r = client.post(f"/v1/deployments/{dep_id}/users", json={"ttl_s": 1}, headers=admin())
        issued = api.CredentialIssued.model_validate(r.json())
        assert r.headers["cache-control"] == "no-store" and issued.deployment_id == dep_id
        while time.time() < issued.expires_at:
            time.sleep(0.05)
        url = f"/v1/deployments/{dep_id}/user-key"
        _error(client.get(url, headers=bearer(issued.credential)), 401, api.E_UNAUTHORIZED, "expired")
        default = client.post(f"/v1/deployments/{dep_id}/users", headers=admin()).json()
        assert default["expires_at"] - time.time() > 29 * 86_400  # the 30-day default
        _error(client.post(f"/v1/deployments/{dep_id}/users", json={"ttl_s": 0}, headers=admin()), 422, "bad_input")


# --- restart and recovery ----------------------------------------------------------------------------


def test_restart_keeps_models_deployments_and_credentials(p1, model_dir: Path) -> None:
    with p1() as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        token = issue(client, dep_id)
        models = client.get("/v1/models", headers=admin()).json()
        status = client.get(f"/v1/deployments/{dep_id}", headers=admin()).json()
        fingerprint = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token)).headers[
            api.FINGERPRINT_HEADER
        ]
        public_key = client.app.state.service.signer.public_key
    with p1() as client:
        assert client.get("/v1/models", headers=admin()).json() == models
        assert client.get(f"/v1/deployments/{dep_id}", headers=admin()).json() == status
        r = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token))
        assert r.status_code == 200 and r.headers[api.FINGERPRINT_HEADER] == fingerprint
        assert client.app.state.service.signer.public_key == public_key
        assert len(client.get(f"/v1/deployments/{dep_id}/users", headers=admin()).json()) == 1


def test_restart_marks_an_interrupted_rotation(p1, model_dir: Path, tmp_path: Path) -> None:
    with p1() as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        token = issue(client, dep_id)
        # what a crash mid-rotation leaves: state says rotating, a half-written version dir
        client.app.state.service.store.update_deployment(
            dep_id, status="rotating", pending_key_version=2, last_version=2, progress={"stage": "transforming"}
        )
    ddir = tmp_path / "data" / "deployments" / dep_id
    (ddir / ".v2.partial-abc" / "cloud").mkdir(parents=True)
    (ddir / "v2" / "cloud").mkdir(parents=True)
    with p1() as client:
        status = client.get(f"/v1/deployments/{dep_id}", headers=admin()).json()
        assert status["status"] == "active" and status["key_version"] == 1 and status["pending_key_version"] is None
        assert "interrupted" in status["error"] and status["progress"]["stage"] == "failed"
        assert sorted(p.name for p in ddir.iterdir()) == ["v1"]
        assert client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(token)).status_code == 200
        client.post(f"/v1/deployments/{dep_id}/rotate", headers=admin())
        assert wait(client, dep_id)["key_version"] == 3  # version 2 is never reused


def test_restart_adopts_a_version_p2_did_activate(p1, model_dir: Path, cloud, tmp_path: Path) -> None:
    with p1() as client:
        dep_id = deploy(client, model_dir)["deployment_id"]
        client.app.state.service.store.update_deployment(
            dep_id, status="rotating", pending_key_version=2, last_version=2, progress={"stage": "pushing"}
        )
    ddir = tmp_path / "data" / "deployments" / dep_id
    result = transform_model_dir(model_dir, ddir / "v2", key_version=2, progress=False)
    cloud.reported[dep_id] = 2  # the push got through; P1 died before recording it
    with p1() as client:
        status = client.get(f"/v1/deployments/{dep_id}", headers=admin()).json()
        assert status["status"] == "active" and status["key_version"] == 2 and status["error"] is None
        r = client.get(f"/v1/deployments/{dep_id}/user-key", headers=bearer(issue(client, dep_id)))
        assert r.headers[api.FINGERPRINT_HEADER] == result.key.user.fingerprint
    assert sorted(p.name for p in ddir.iterdir()) == ["v2"]


# --- health, metrics, error shape -----------------------------------------------------------------------


def test_health_metrics_and_the_error_shape(p1, model_dir: Path) -> None:
    with p1() as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        assert client.get("/health/ready").json() == {"status": "ready"}
        deploy(client, model_dir)
        client.get("/v1/models")
        text = client.get("/metrics").text
        assert 'stip_developer_http_requests_total{method="GET",route="/v1/models",status="401"} 1.0' in text
        assert 'stip_developer_jobs_total{kind="deploy",outcome="succeeded"} 1.0' in text
        assert 'stip_developer_deployments{status="active"} 1.0' in text
        assert "stip_developer_pushed_bytes_total" in text and ADMIN not in text
        _error(client.get("/v1/nothing-here"), 404, api.E_NOT_FOUND)
    with p1(admin_token=None) as client:
        _error(client.get("/v1/models", headers=admin()), 503, api.E_NOT_READY, "admin")
