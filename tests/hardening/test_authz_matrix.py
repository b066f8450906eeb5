"""Who may call what: every route of P1 and P2 against every kind of credential.

The route tables below are checked against the applications' own routes, so a route added
without a line here fails `test_every_route_is_in_the_matrix`. Each protected route is called
with: no credential, malformed headers, a forged, tampered, expired or revoked credential, a
genuine credential of ANOTHER deployment (signed with the same P1 key, as P1 signs every
deployment's credentials with one key: its deployment claim is all that keeps it out), a
genuine credential spelt otherwise (its base64 malleated: junk, the +/ alphabet, padding,
unused bits), the admin token, the push token and the user
credential, each where another is due; the expected answer is 401 (403 for a genuine credential
of another deployment) in the one error shape, without the token in it and without a side
effect; with its own credential the route succeeds. Health, metrics, the API docs and P2's
public deployment facts answer anyone.

Also here: tokens are compared with `secrets.compare_digest` (observed at run time), P1 keeps
only hashes of the credentials it issues (no file of its data directory holds a token), and
its key files are owner-only.
"""

import ast
import base64
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cloud_service.app import create_app as create_cloud
from developer_service.app import create_app as create_developer
from shared import wire
from shared.api import (
    DIGEST_HEADER,
    E_FORBIDDEN,
    E_UNAUTHORIZED,
    INPUTS_EMBEDS,
    KEY_VERSION_HEADER,
    META_SESSION_LENGTH,
)
from shared.credentials import Signer
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, Reply, push, serve
from tests.cloud_service.helpers import settings_for as cloud_settings
from tests.developer_service.conftest import ADMIN, CLOUD_URL, PUSH, FakeCloud, admin, deploy, issue, register
from tests.developer_service.conftest import settings_for as developer_settings
from tests.hardening.stacks import (
    FOREIGN_DEPLOYMENT,
    OTHER_DEPLOYMENT,
    CloudModel,
    build_cloud_model,
    developer_model_dir,
)
from tests.support import malleable, malleated

ROOT = Path(__file__).resolve().parents[2]

# --- credentials ------------------------------------------------------------------------------
# A kind of credential is a function of the service under test giving the Authorization header
# (or none). The three genuine kinds are "admin", "push" and "user"; the route's `needs` says
# which one opens it.

Headers = dict[str, str]


def _bearer(token: str) -> Headers:
    return {"Authorization": f"Bearer {token}"}


def _tampered(token: str) -> str:
    """The token with one character of its signature changed (one in the middle: every bit counts)."""
    head, _, signature = token.rpartition(".")
    i = len(signature) // 2
    return f"{head}.{signature[:i]}{'B' if signature[i] == 'A' else 'A'}{signature[i + 1 :]}"


def _nested(deployment_id: str) -> str:
    """A credential-shaped token whose payload is JSON nested past Python's recursion limit."""
    payload = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    return f"stip1.{payload}.{deployment_id}"


@dataclass
class Service:
    """A running service and the tokens of each kind for its deployment A (and B)."""

    client: TestClient
    tokens: dict[str, str]  # kind -> token
    state: Callable[[], Any] = lambda: None  # what a refused call must leave unchanged
    data: dict[str, Any] = field(default_factory=dict)

    def headers(self, kind: str) -> Headers:
        special = {
            "none": {},
            "scheme not bearer": {"Authorization": f"Basic {self.tokens['user']}"},
            "bearer without token": {"Authorization": "Bearer "},
            "token without scheme": {"Authorization": self.tokens["user"]},
            "garbage": _bearer("stip1.not.a-credential"),
        }
        return special[kind] if kind in special else _bearer(self.tokens[kind])


COMMON_KINDS = [
    "none",
    "scheme not bearer",
    "bearer without token",
    "token without scheme",
    "garbage",
    "nested json",
    "forged",  # right shape, signed by a key that is not P1's
    "tampered",  # a genuine credential with its signature altered
    "expired",
    "other deployment",  # a genuine, valid credential of another deployment, signed by the same P1 key
    *(f"malleated: {kind}" for kind in ("junk characters", "+/ alphabet", "padding", "extra padding", "unused bits")),
    "admin",
    "push",
    "user",
]
VICTIM = "dep-victim"  # what the accepted DELETE of a deployment removes (refused ones leave it)
# cross-signed: for deployment A, signed with the key of another P1 whose deployment P2 also serves;
# foreign deployment: a genuine credential of that other P1's deployment
# session token: the token of a live session of user A, which opens only that session's forward
# steps (test_a_session_token_opens_its_own_sessions_steps_only), no route as the credential does
CLOUD_KINDS = [*COMMON_KINDS, "revoked", "cross-signed", "foreign deployment", "session token"]
DEVELOPER_KINDS = [*COMMON_KINDS, "revoked"]


def expected(needs: str, kind: str) -> int:
    """The status of a call; `needs` is "open", "admin", "push" or "user"."""
    if needs == "open" or kind == needs:
        return 200
    if needs == "user" and kind in ("other deployment", "foreign deployment"):
        return 403
    return 401


# --- P2 ----------------------------------------------------------------------------------------

Call = Callable[[Service, Headers], Reply]


def _forward(s: Service, h: Headers) -> Reply:
    return s.client.post(f"/v1/deployments/{DEPLOYMENT}/forward", content=s.data["request"], headers=h)


def _generate(s: Service, h: Headers) -> Reply:
    return s.client.post(
        f"/v1/deployments/{DEPLOYMENT}/generate", json={"input_ids": [1, 2], "max_tokens": 2}, headers=h
    )


def _session(s: Service) -> str:
    """A fresh session of user A (so that a refused delete is refused for its credential alone)."""
    reply = s.client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=_bearer(s.tokens["user"]))
    assert reply.status_code == 201, reply.text
    return str(reply.json()["session_id"])


def _delete_session(s: Service, h: Headers) -> Reply:
    session = _session(s)
    reply = s.client.delete(f"/v1/sessions/{session}", headers=h)
    if not reply.is_success:  # refused: the session still serves its user
        step = s.client.post(
            f"/v1/deployments/{DEPLOYMENT}/forward",
            params={"session_id": session},
            content=s.data["request"],
            headers=_bearer(s.tokens["user"]),
        )
        assert step.status_code == 200, step.text
        # its owner ends it, so the matrix's sessions stay within the per-user quota
        assert s.client.delete(f"/v1/sessions/{session}", headers=_bearer(s.tokens["user"])).is_success
    return reply


def _push(s: Service, h: Headers) -> Reply:
    body, digest = s.data["push"]
    url = f"/v1/deployments/{DEPLOYMENT}/weights"
    return s.client.put(url, content=body, headers={**h, DIGEST_HEADER: digest, "Content-Type": wire.CONTENT_TYPE})


def _revocations(s: Service, h: Headers) -> Reply:
    """P1 sends the same list again (the revoked credential stays revoked for the other calls)."""
    url = f"/v1/deployments/{DEPLOYMENT}/revocations"
    return s.client.put(url, json=s.data["revocations"], headers=h)


def _get(path: str) -> Call:
    return lambda s, h: s.client.get(path, headers=h)


DOCS: dict[tuple[str, str], tuple[str, int, Call]] = {
    ("GET", "/openapi.json"): ("open", 200, _get("/openapi.json")),
    ("GET", "/docs"): ("open", 200, _get("/docs")),
    ("GET", "/docs/oauth2-redirect"): ("open", 200, _get("/docs/oauth2-redirect")),
    ("GET", "/redoc"): ("open", 200, _get("/redoc")),
    ("GET", "/health/live"): ("open", 200, _get("/health/live")),
    ("GET", "/health/ready"): ("open", 200, _get("/health/ready")),
    ("GET", "/metrics"): ("open", 200, _get("/metrics")),
}

# (method, path) -> (what opens it, its success status, how to call it)
CLOUD_ROUTES: dict[tuple[str, str], tuple[str, int, Call]] = {
    **DOCS,
    ("GET", "/v1/deployments/{deployment_id}"): ("open", 200, _get(f"/v1/deployments/{DEPLOYMENT}")),
    ("PUT", "/v1/deployments/{deployment_id}/weights"): ("push", 200, _push),
    # where the push being installed stands: none is, so P1's push token gets the 404 that says so
    # (the report itself: tests/cloud_service/test_push_progress.py)
    ("GET", "/v1/deployments/{deployment_id}/weights"): ("push", 404, _get(f"/v1/deployments/{DEPLOYMENT}/weights")),
    ("PUT", "/v1/deployments/{deployment_id}/revocations"): ("push", 200, _revocations),
    ("POST", "/v1/deployments/{deployment_id}/sessions"): (
        "user",
        201,
        lambda s, h: s.client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=h),
    ),
    ("DELETE", "/v1/sessions/{session_id}"): ("user", 204, _delete_session),
    ("POST", "/v1/deployments/{deployment_id}/forward"): ("user", 200, _forward),
    ("DELETE", "/v1/deployments/{deployment_id}"): (  # P1 deleted it: the fixture's victim deployment
        "push",
        200,
        lambda s, h: s.client.delete(f"/v1/deployments/{VICTIM}", headers=h),
    ),
    # the deployment serves embeds mode: an admitted user gets the 400 that says so (token mode:
    # tests/cloud_service/test_generate.py)
    ("POST", "/v1/deployments/{deployment_id}/generate"): ("user", 400, _generate),
}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("authz-cloud")
    model: CloudModel = build_cloud_model(root)
    with serve(root / "data") as client:
        for deployment_id in (DEPLOYMENT, OTHER_DEPLOYMENT, FOREIGN_DEPLOYMENT):
            assert push(client, *model.push_body(deployment_id), deployment_id=deployment_id).status_code == 200
        victim = model.push_body(VICTIM)  # deleted by the one accepted DELETE
        assert push(client, *victim, deployment_id=VICTIM).status_code == 200
        user = malleable(model.credential)
        expired, _ = model.signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=60, now=1_000_000)
        forged, _ = Signer.generate().issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
        cross, _ = model.foreign_signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
        revoked, claims = model.signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
        revocations = {"revoked": [{"jti": claims.jti, "expires_at": claims.exp}]}
        reply = client.put(f"/v1/deployments/{DEPLOYMENT}/revocations", json=revocations, headers=_bearer(PUSH_TOKEN))
        assert reply.status_code == 200, reply.text
        opened = client.post(f"/v1/deployments/{DEPLOYMENT}/sessions", headers=_bearer(user))
        assert opened.status_code == 201, opened.text
        tokens = {
            "user": user,
            "session token": opened.json()["session_token"],
            "push": PUSH_TOKEN,
            "admin": ADMIN,  # P1's admin token has no power on P2
            "forged": forged,
            "tampered": _tampered(user),
            "expired": expired,
            "other deployment": model.credential(OTHER_DEPLOYMENT),
            "cross-signed": cross,
            "foreign deployment": model.credential(FOREIGN_DEPLOYMENT),
            "revoked": revoked,
            "nested json": _nested(OTHER_DEPLOYMENT),
            **{f"malleated: {k}": t for k, t in malleated(user).items()},
        }
        revoked_file = root / "data" / "deployments" / DEPLOYMENT / "revoked.json"

        def state() -> Any:
            infos = [client.get(f"/v1/deployments/{d}").json() for d in (DEPLOYMENT, OTHER_DEPLOYMENT)]
            return [(i["deployment_id"], i["key_version"]) for i in infos], revoked_file.read_text()

        data = {
            "request": model.valid_request()[0],
            "push": model.push_body(),
            "revocations": revocations,
            "other user": model.credential(OTHER_DEPLOYMENT),
            "session": opened.json()["session_id"],  # the session of the "session token"
        }
        yield Service(client, tokens, state, data)


@pytest.mark.parametrize("kind", CLOUD_KINDS)
@pytest.mark.parametrize("route", CLOUD_ROUTES, ids=" ".join)
def test_cloud(cloud: Service, route: tuple[str, str], kind: str) -> None:
    check(cloud, CLOUD_ROUTES[route], kind)


# --- P1 ------------------------------------------------------------------------------------------


def _dev(method: str, path: str, body: Callable[[Service], Any] | None = None) -> Call:
    """A call of P1's route `path` ({a} is deployment A, {model}, {victim}: ids of the fixture)."""

    def call(s: Service, h: Headers) -> Reply:
        ids = dict(s.data["ids"])
        if "{victim}" in path:
            ids["victim"] = s.data["new_user"]()  # a fresh user to revoke, each time
        reply = s.client.request(method, path.format(**ids), headers=h, json=body(s) if body else None)
        if "{victim}" in path and not reply.is_success:  # refused: the victim still holds a live credential
            users = s.client.get(path.format(**ids).rsplit("/", 1)[0], headers=admin()).json()
            assert [u["revoked"] for u in users if u["user_id"] == ids["victim"]] == [False]
        return reply

    return call


DEVELOPER_ROUTES: dict[tuple[str, str], tuple[str, int, Call]] = {
    **DOCS,
    ("POST", "/v1/models"): ("admin", 200, _dev("POST", "/v1/models", lambda s: {"path": s.data["model_dir"]})),
    ("GET", "/v1/models"): ("admin", 200, _dev("GET", "/v1/models")),
    ("GET", "/v1/models/{model_id}"): ("admin", 200, _dev("GET", "/v1/models/{model}")),
    ("POST", "/v1/deployments"): (
        "admin",
        202,
        _dev("POST", "/v1/deployments", lambda s: {"model_id": s.data["ids"]["model"], "cloud_url": CLOUD_URL}),
    ),
    ("GET", "/v1/deployments"): ("admin", 200, _dev("GET", "/v1/deployments")),
    ("GET", "/v1/deployments/{deployment_id}"): ("admin", 200, _dev("GET", "/v1/deployments/{a}")),
    ("POST", "/v1/deployments/{deployment_id}/rotate"): ("admin", 202, _dev("POST", "/v1/deployments/{a}/rotate")),
    ("POST", "/v1/deployments/{deployment_id}/users"): (
        "admin",
        201,
        _dev("POST", "/v1/deployments/{a}/users", lambda s: {"name": "mallory"}),
    ),
    ("GET", "/v1/deployments/{deployment_id}/users"): ("admin", 200, _dev("GET", "/v1/deployments/{a}/users")),
    ("DELETE", "/v1/deployments/{deployment_id}/users/{user_id}"): (
        "admin",
        200,
        _dev("DELETE", "/v1/deployments/{a}/users/{victim}"),
    ),
    ("GET", "/v1/deployments/{deployment_id}/user-key"): ("user", 200, _dev("GET", "/v1/deployments/{a}/user-key")),
    ("DELETE", "/v1/deployments/{deployment_id}"): ("admin", 200, _dev("DELETE", "/v1/deployments/{victim_dep}")),
    ("DELETE", "/v1/models/{model_id}"): ("admin", 200, _dev("DELETE", "/v1/models/{victim_model}")),
}


@pytest.fixture(scope="module")
def developer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("authz-developer")
    model_dir = developer_model_dir(root)
    app = create_developer(developer_settings(root / "data"), transport=FakeCloud().transport)
    with TestClient(app) as client:
        service = app.state.service
        a = deploy(client, model_dir)
        b = deploy(client, model_dir)
        victim = deploy(client, model_dir)  # deleted by the one accepted DELETE (refused ones leave it)
        assert a["status"] == b["status"] == victim["status"] == "active"
        victim_model = register(client, model_dir, name="victim")  # no deployment uses it
        user = malleable(lambda: issue(client, a["deployment_id"], name="alice"))
        short = client.post(f"/v1/deployments/{a['deployment_id']}/users", json={"ttl_s": 1}, headers=admin())
        revoked = issue(client, a["deployment_id"], name="revoked")
        users = client.get(f"/v1/deployments/{a['deployment_id']}/users", headers=admin()).json()
        revoked_id = next(u["user_id"] for u in users if u["name"] == "revoked")
        assert client.delete(f"/v1/deployments/{a['deployment_id']}/users/{revoked_id}", headers=admin()).is_success
        forged, _ = Signer.generate().issue(subject="alice", deployment_id=a["deployment_id"], ttl_s=3600)
        tokens = {
            "user": user,
            "admin": ADMIN,
            "push": PUSH,  # the token P1 sends to P2 opens nothing on P1
            "forged": forged,
            "tampered": _tampered(user),
            "expired": short.json()["credential"],
            "revoked": revoked,
            "other deployment": issue(client, b["deployment_id"], name="bob"),
            "nested json": _nested(b["deployment_id"]),
            **{f"malleated: {k}": t for k, t in malleated(user).items()},
        }
        time.sleep(max(0.0, short.json()["expires_at"] - time.time()))  # the 1 s credential has expired

        def new_user() -> str:
            url = f"/v1/deployments/{a['deployment_id']}/users"
            reply = client.post(url, json={"name": "victim"}, headers=admin())
            return str(reply.json()["user_id"])

        def state() -> Any:
            for d in client.get("/v1/deployments", headers=admin()).json():  # let running jobs finish
                service.wait(d["deployment_id"], timeout_s=60)
            models = client.get("/v1/models", headers=admin()).json()
            deployments = client.get("/v1/deployments", headers=admin()).json()
            users = client.get(f"/v1/deployments/{a['deployment_id']}/users", headers=admin()).json()
            kept = [(u["user_id"], u["revoked"]) for u in users if u["name"] != "victim"]  # victims: see _dev
            return models, [(d["deployment_id"], d["key_version"]) for d in deployments], kept

        data = {
            "ids": {
                "a": a["deployment_id"],
                "model": a["model_id"],
                "victim_dep": victim["deployment_id"],
                "victim_model": victim_model["model_id"],
            },
            "model_dir": str(model_dir),
            "new_user": new_user,
            "data_dir": root / "data",
        }
        yield Service(client, tokens, state, data)
        service.wait(a["deployment_id"], timeout_s=60)


@pytest.mark.parametrize("kind", DEVELOPER_KINDS)
@pytest.mark.parametrize("route", DEVELOPER_ROUTES, ids=" ".join)
def test_developer(developer: Service, route: tuple[str, str], kind: str) -> None:
    check(developer, DEVELOPER_ROUTES[route], kind)


def _step(s: Service, session_id: str, token: str, deployment_id: str = DEPLOYMENT) -> Reply:
    return s.client.post(
        f"/v1/deployments/{deployment_id}/forward",
        params={"session_id": session_id},
        content=s.data["request"],
        headers=_bearer(token),
    )


def test_a_session_token_opens_its_own_sessions_steps_only(cloud: Service) -> None:
    """The token a session was opened with authenticates that session's forward steps, on its own
    deployment; another session's token, a token of another deployment's session, a made-up one
    and the right one on the wrong deployment get 401 in the one error shape, without a side effect."""

    def opened(deployment_id: str, credential: str) -> tuple[str, str]:
        reply = cloud.client.post(f"/v1/deployments/{deployment_id}/sessions", headers=_bearer(credential))
        assert reply.status_code == 201, reply.text
        return reply.json()["session_id"], reply.json()["session_token"]

    user, foreign_user = cloud.tokens["user"], cloud.data["other user"]
    mine, other, foreign = opened(DEPLOYMENT, user), opened(DEPLOYMENT, user), opened(OTHER_DEPLOYMENT, foreign_user)
    refused = {
        "another session's token": (mine[0], other[1], DEPLOYMENT),
        "a token of another deployment's session": (mine[0], foreign[1], DEPLOYMENT),
        "a made-up token": (mine[0], secrets.token_urlsafe(16), DEPLOYMENT),
        "another deployment's session, its own token, this deployment": (foreign[0], foreign[1], DEPLOYMENT),
        "this session, its own token, another deployment": (mine[0], mine[1], OTHER_DEPLOYMENT),
    }
    for case, (session_id, token, deployment_id) in refused.items():
        reply = _step(cloud, session_id, token, deployment_id)
        assert reply.status_code == 401, (case, reply.status_code, reply.text)
        assert reply.json()["error"]["code"] == E_UNAUTHORIZED, case
        assert reply.headers["www-authenticate"] == "Bearer"
        assert all(t not in reply.text for t in (*mine, *other, *foreign)), case
    seq = wire.decode(cloud.data["request"])[0][INPUTS_EMBEDS].shape[1]
    for (session_id, token), deployment_id in ((mine, DEPLOYMENT), (foreign, OTHER_DEPLOYMENT)):
        reply = _step(cloud, session_id, token, deployment_id)
        assert reply.status_code == 200, reply.text
        assert wire.decode(reply.content)[1][META_SESSION_LENGTH] == str(seq)  # the refused steps extended nothing
    for (session_id, _), credential in ((mine, user), (other, user), (foreign, foreign_user)):
        assert cloud.client.delete(f"/v1/sessions/{session_id}", headers=_bearer(credential)).is_success


def test_credentials_are_checked_before_the_request_is(cloud: Service, developer: Service) -> None:
    """A caller without the right credential learns nothing of what a valid request looks like:
    malformed headers, queries and bodies get 401 from every protected route, not 400/422."""
    dep = developer.data["ids"]["a"]
    calls = [
        (cloud, "PUT", f"/v1/deployments/{DEPLOYMENT}/weights", {"headers": {KEY_VERSION_HEADER: "x"}}),
        (cloud, "PUT", f"/v1/deployments/{DEPLOYMENT}/revocations", {"json": {"revoked": [{"jti": ""}]}}),
        (cloud, "POST", f"/v1/deployments/{DEPLOYMENT}/forward", {"params": {"k": "x", "output": "?"}}),
        (cloud, "POST", f"/v1/deployments/{DEPLOYMENT}/sessions", {"headers": {KEY_VERSION_HEADER: "0"}}),
        (developer, "POST", "/v1/models", {"json": {"nope": 1}}),
        (developer, "POST", "/v1/deployments", {"json": []}),
        (developer, "POST", f"/v1/deployments/{dep}/users", {"json": {"ttl_s": -1}}),
    ]
    for service, method, path, kwargs in calls:
        extra = kwargs.pop("headers", {})
        for kind in ("none", "garbage"):
            reply = service.client.request(method, path, headers={**service.headers(kind), **extra}, **kwargs)
            assert reply.status_code == 401, (method, path, kind, reply.status_code, reply.text)


# --- the check ------------------------------------------------------------------------------------


def check(service: Service, route: tuple[str, int, Call], kind: str) -> None:
    needs, success, call = route
    status = expected(needs, kind)
    before = service.state() if status >= 400 else None
    reply = call(service, service.headers(kind))
    if status == 200:
        assert reply.status_code == success, (kind, reply.status_code, reply.text)
        return
    assert reply.status_code == status, (kind, reply.status_code, reply.text)
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == (E_FORBIDDEN if status == 403 else E_UNAUTHORIZED)
    assert body["error"]["message"]
    assert all(token not in reply.text for token in service.tokens.values())
    if status == 401:
        assert reply.headers["www-authenticate"] == "Bearer"
    assert service.state() == before, "a refused call changed the service's state"


# --- the route tables are complete -----------------------------------------------------------------


def routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route the application serves, included routers walked."""
    found: set[tuple[str, str]] = set()

    def walk(items: list[Any], prefix: str) -> None:
        for route in items:
            included = getattr(route, "original_router", None)  # FastAPI includes routers lazily
            if included is not None:
                walk(included.routes, prefix + getattr(route.include_context, "prefix", ""))
                continue
            for method in getattr(route, "methods", None) or ():
                if method != "HEAD":
                    found.add((method, prefix + route.path))

    walk(app.routes, "")
    spec = app.openapi()["paths"]
    assert {(m.upper(), p) for p, ops in spec.items() for m in ops} <= found, "the walk missed a route"
    return found


def test_every_route_is_in_the_matrix(tmp_path: Path) -> None:
    assert routes(create_cloud(cloud_settings(tmp_path))) == set(CLOUD_ROUTES)
    assert routes(create_developer(developer_settings(tmp_path))) == set(DEVELOPER_ROUTES)


# --- how tokens are compared and kept --------------------------------------------------------------


def test_tokens_are_compared_with_compare_digest(
    cloud: Service, developer: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, Any]] = []
    compare = secrets.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(secrets, "compare_digest", spy)
    wrong = "wrong-token-of-the-same-length-"
    assert _push(cloud, _bearer(wrong)).status_code == 401
    assert (wrong.encode(), PUSH_TOKEN.encode()) in calls  # P2: the push token
    calls.clear()
    assert _step(cloud, cloud.data["session"], wrong).status_code == 401
    assert (wrong.encode(), cloud.tokens["session token"].encode()) in calls  # P2: a session's token
    calls.clear()
    assert developer.client.get("/v1/models", headers=_bearer(wrong)).status_code == 401
    assert (wrong.encode(), ADMIN.encode()) in calls  # P1: the admin token
    calls.clear()
    user = developer.tokens["user"]
    assert developer.client.get(
        f"/v1/deployments/{developer.data['ids']['a']}/user-key", headers=_bearer(user)
    ).is_success
    digest = hashlib.sha256(user.encode()).hexdigest()
    assert (digest, digest) in calls  # P1: the stored hash of a user credential


def _equality_on_secrets(path: Path) -> list[str]:
    """`==` / `!=` with a token, a secret or a digest on either side, in one source file."""
    names = ("token", "secret", "password", "credential")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare) or not any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            continue
        for operand in (node.left, *node.comparators):
            text = ast.unparse(operand)
            bare = isinstance(operand, (ast.Name, ast.Attribute)) or "get_secret_value" in text
            if bare and any(n in text.lower() for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
                break
    return found


def test_no_token_is_compared_with_equality() -> None:
    files = [*sorted((ROOT / "developer_service").glob("*.py")), *sorted((ROOT / "cloud_service").glob("*.py"))]
    files.append(ROOT / "shared" / "credentials.py")
    assert [hit for f in files for hit in _equality_on_secrets(f)] == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_p1_keeps_hashes_of_credentials_and_owner_only_keys(developer: Service) -> None:
    data: Path = developer.data["data_dir"]
    files = [p for p in data.rglob("*") if p.is_file()]
    issued = [t for k, t in developer.tokens.items() if k in ("user", "expired", "revoked", "other deployment")]
    state = (data / "state.json").read_text()
    for token in issued:
        assert hashlib.sha256(token.encode()).hexdigest() in state  # P1 did record it
    secrets_ = (
        [t.encode() for t in issued] + [t.split(".")[2].encode() for t in issued] + [ADMIN.encode(), PUSH.encode()]
    )
    for path in files:
        content = path.read_bytes()
        assert not any(s in content for s in secrets_), f"{path.relative_to(data)} holds a token"
    keys = [p for p in files if p.name in ("signing.key", "state.json", "key.safetensors")]
    assert len(keys) >= 2 + 2 * 2  # signing key, state, and two key files per deployment
    assert {p.relative_to(data).as_posix(): oct(_mode(p)) for p in keys if _mode(p) != 0o600} == {}
    dirs = [data, *(p for p in data.rglob("developer") if p.is_dir())]
    assert {p.relative_to(data).as_posix(): oct(_mode(p)) for p in dirs if _mode(p) != 0o700} == {}
