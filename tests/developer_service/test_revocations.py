"""A revocation on P1 reaches P2, which checks credentials offline: at once, or by retrying."""

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

from tests.developer_service.conftest import FakeCloud, admin, deploy, issue, wait


def jti(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def revoke(client, deployment_id: str, name: str) -> dict:
    users = client.get(f"/v1/deployments/{deployment_id}/users", headers=admin()).json()
    user_id = next(u["user_id"] for u in users if u["name"] == name)
    reply = client.delete(f"/v1/deployments/{deployment_id}/users/{user_id}", headers=admin())
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def sent(cloud: FakeCloud, deployment_id: str) -> list[str] | None:
    entries = cloud.revocations.get(deployment_id)
    return None if entries is None else sorted(str(e["jti"]) for e in entries)


def eventually(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_revocation_reaches_p2_at_once(p1, model_dir: Path, cloud: FakeCloud) -> None:
    with p1() as client:
        dep = deploy(client, model_dir)["deployment_id"]
        mallory, alice = issue(client, dep, name="mallory"), issue(client, dep, name="alice")
        assert sent(cloud, dep) == []  # the push sent the (empty) list along
        answer = revoke(client, dep, "mallory")
        assert answer["revoked"] is True and answer["cloud_synced"] is True
        assert sent(cloud, dep) == [jti(mallory)] and jti(alice) not in sent(cloud, dep)  # type: ignore[operator]
        assert cloud.revocations[dep][0]["expires_at"] == answer["expires_at"]
        listed = client.get(f"/v1/deployments/{dep}/users", headers=admin()).json()
        assert all(u["cloud_synced"] is None for u in listed)  # only a revocation's answer says


def test_p2_down_at_revocation_gets_the_list_later(p1, model_dir: Path, cloud: FakeCloud) -> None:
    with p1() as client:
        dep = deploy(client, model_dir)["deployment_id"]
        first, second = issue(client, dep, name="first"), issue(client, dep, name="second")
        cloud.refuse_revocations = 503
        assert revoke(client, dep, "first")["cloud_synced"] is False
        assert revoke(client, dep, "second")["cloud_synced"] is False  # one background sender, latest list
        assert sent(cloud, dep) == []
        cloud.refuse_revocations = None  # P2 is back: the sender delivers within its backoff
        assert eventually(lambda: sent(cloud, dep) == sorted([jti(first), jti(second)]))


def test_a_push_and_a_restart_send_the_list_again(p1, model_dir: Path, cloud: FakeCloud) -> None:
    with p1() as client:
        dep = deploy(client, model_dir)["deployment_id"]
        token = issue(client, dep, name="mallory")
        revoke(client, dep, "mallory")
        cloud.revocations.clear()  # P2 lost its list (say, its data directory was restored)
        assert client.post(f"/v1/deployments/{dep}/rotate", headers=admin()).status_code == 202
        assert wait(client, dep)["key_version"] == 2
        assert sent(cloud, dep) == [jti(token)]
    cloud.revocations.clear()
    with p1():  # P1's start sends every deployment's list in the background
        assert eventually(lambda: sent(cloud, dep) == [jti(token)])
