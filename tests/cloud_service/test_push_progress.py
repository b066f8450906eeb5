"""P2's report of a push it is installing (`GET /v1/deployments/{id}/weights`, P1's push token):
verifying, loading (tensor bytes of θ′ read, of all of them), testing, activating; then 404."""

import threading
from pathlib import Path

import pytest
from safetensors import safe_open

from shared.api import E_NOT_FOUND, E_UNAUTHORIZED, LoadProgress
from shared.credentials import Signer
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, Deployed, assert_error, push, serve

PROGRESS_PATH = f"/v1/deployments/{DEPLOYMENT}/weights"
AUTH = {"Authorization": f"Bearer {PUSH_TOKEN}"}


def _tensor_bytes(deployed: Deployed) -> int:
    """Bytes of θ′'s tensors, counted from the tensors themselves (not from headers)."""
    total = 0
    for path in deployed.result.cloud_files:
        with safe_open(str(path), "pt") as f:
            total += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())  # noqa: SIM118
    return total


def test_p2_reports_each_stage_of_installing_a_push_in_order(
    tmp_path: Path, v1: Deployed, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    body, digest = v1.body(signer)
    total = _tensor_bytes(v1)
    with serve(tmp_path / "data") as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        assert_error(client.get(PROGRESS_PATH, headers=AUTH), 404, E_NOT_FOUND)  # nothing being installed
        reports: list[LoadProgress] = []
        testing, release = threading.Event(), threading.Event()
        report = service._report

        def recorded(*args: object) -> None:
            report(*args)
            reports.append(service._installing[DEPLOYMENT])
            if reports[-1].stage == "testing":  # hold P2 in its test forward
                testing.set()
                assert release.wait(60)

        monkeypatch.setattr(service, "_report", recorded)
        replies: list[object] = []
        pusher = threading.Thread(target=lambda: replies.append(push(client, body, digest)))
        pusher.start()
        try:
            assert testing.wait(60)
            held = client.get(PROGRESS_PATH, headers=AUTH)
            assert held.status_code == 200, held.text
            assert LoadProgress.model_validate_json(held.content) == LoadProgress(
                deployment_id=DEPLOYMENT, key_version=1, stage="testing", done=total, total=total
            )
            assert_error(client.get(PROGRESS_PATH), 401, E_UNAUTHORIZED)  # P1's push token only
            assert_error(client.get(PROGRESS_PATH, headers={"Authorization": "Bearer nope"}), 401, E_UNAUTHORIZED)
        finally:
            release.set()
            pusher.join(60)
        assert replies and replies[0].status_code == 200  # type: ignore[attr-defined]
        assert_error(client.get(PROGRESS_PATH, headers=AUTH), 404, E_NOT_FOUND)  # installed: no report left

    stages = [r.stage for r in reports]
    assert stages[0] == "verifying" and stages[-2:] == ["testing", "activating"]
    loading = [r for r in reports if r.stage == "loading"]
    assert stages[1 : 1 + len(loading)] == ["loading"] * len(loading)  # verifying, loading..., testing, activating
    assert len(loading) >= 3 and {r.total for r in loading} == {total}  # one report per tensor, one total
    assert loading[0].done == 0 and loading[-1].done == total
    assert all(a.done < b.done for a, b in zip(loading, loading[1:], strict=False))
    assert all(r.key_version == 1 and r.deployment_id == DEPLOYMENT for r in reports)
