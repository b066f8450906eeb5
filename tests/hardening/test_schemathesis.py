"""Schemathesis against both services' OpenAPI specs, in process, each with a real deployment.

Every operation of each spec gets schemathesis' positive and negative cases twice: once with
the credential that opens it (`Authorization: Bearer ...`) and the real deployment in its path,
so that the generated headers, queries and bodies reach the handlers, and once without (a
generated header, or none). The safetensors bodies (forward, weight push) are in the specs as
`application/octet-stream`: schemathesis sends random bytes there, and forward also gets valid
bodies so that its options are exercised on a real pass.

Checks on every answer: never a 5xx; status, content type and JSON body as the spec says; every
error in the one shape `{"error": {"code", "message"}}`, without any token in it; no 2xx from a
protected operation without its credential. After each operation's run the service still
answers a valid request correctly (P2: the same logits as its first answer and as plaintext
inference; P1: the user bundle of the live key version).
"""

import hashlib
import io
import json
import shutil
import struct
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cloud_service.app import create_app as create_cloud
from developer_service.app import create_app as create_developer
from shared import api, wire
from shared.api import ATTENTION_MASK, DIGEST_HEADER, INPUTS_EMBEDS
from tests.cloud_service.helpers import DEPLOYMENT, PUSH_TOKEN, D, push, serve
from tests.cloud_service.helpers import settings_for as cloud_settings
from tests.developer_service.conftest import ADMIN, CLOUD_URL, PUSH, FakeCloud, admin, deploy, issue
from tests.developer_service.conftest import settings_for as developer_settings
from tests.hardening.stacks import OTHER_DEPLOYMENT, CloudModel, build_cloud_model, developer_model_dir
from tests.support import max_abs_diff

MAX_EXAMPLES = 30  # per operation, credential mode and generation mode
OPEN = ("GET /health/live", "GET /health/ready", "GET /metrics")
DELETE_DEPLOYMENT = "DELETE /v1/deployments/{deployment_id}"  # on both services: fuzzed on a victim
VICTIM = "dep-victim"
P2_PUBLIC = ("GET /v1/deployments/{deployment_id}",)  # public facts, no credential (PROTOCOL.md 4)


def _labels(spec: dict[str, Any]) -> list[str]:
    return [f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops]


# The operations, read from the specs at collection time: a new route is fuzzed without a new line here.
CLOUD_OPERATIONS = _labels(create_cloud(cloud_settings(Path("unused"))).openapi())
DEVELOPER_OPERATIONS = _labels(create_developer(developer_settings(Path("unused"))).openapi())


@dataclass
class Target:
    """A running service under schemathesis, with what its operations need to be reached."""

    schema: Any  # schemathesis' OpenApiSchema, its lifespan started
    tokens: dict[str, str]  # label -> the credential that opens the operation
    path_parameters: dict[str, str]  # real ids, used with the valid credential
    open: tuple[str, ...]  # operations that need no credential
    bodies: dict[str, list[tuple[Any, dict[str, str]]]] = field(default_factory=dict)  # label -> valid (body, headers)
    tweaks: dict[str, Callable[[Case], Case]] = field(default_factory=dict)  # label -> edit of a generated case
    victims: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> real ids it may destroy
    alive: Callable[[], None] = lambda: None
    secrets: tuple[str, ...] = ()

    def call(self, label: str, **kwargs: Any) -> Response:
        method, path = label.split(" ", 1)
        return self.schema[path][method].Case(**kwargs).call()


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _without_authorization(case: Case) -> Case:
    if case.headers:
        case.headers.pop("authorization", None)
    return case


def _with_body(body: Any) -> Callable[[Case], Case]:
    def with_body(case: Case) -> Case:
        case.body = body
        return case

    return with_body


def cases(target: Target, label: str, credential: bool) -> st.SearchStrategy[Case]:
    """Generated cases (positive and negative), in the generated path or the real one, and the
    valid bodies; with the operation's credential, or with a generated Authorization or none."""
    method, path = label.split(" ", 1)
    operation = target.schema[path][method]
    tweak = target.tweaks.get(label, lambda case: case)
    auth = _bearer(target.tokens[label]) if credential and label in target.tokens else {}
    ids = {**target.path_parameters, **target.victims.get(label, {})}
    real = {k: v for k, v in ids.items() if "{" + k + "}" in path} or None
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for params in (None, real):
            generated = operation.as_strategy(mode, headers=auth or None, path_parameters=params).map(tweak)
            strategies.append(generated)
            if not credential:
                strategies.append(generated.map(_without_authorization))
    for body, headers in target.bodies.get(label, []):
        # set after drawing: a fixed body in the strategy would land in its (large) repr
        valid = operation.as_strategy(headers={**headers, **auth} or None, path_parameters=real).map(_with_body(body))
        strategies.append(valid if credential else valid.map(_without_authorization))
    return st.one_of(strategies)


def error_shape(target: Target) -> Callable[[CheckContext, Response, Case], None]:
    def error_shape(ctx: CheckContext, response: Response, case: Case) -> None:
        for secret in target.secrets:
            assert secret.encode() not in response.content, "a token is echoed in the answer"
        if response.status_code < 400:
            return
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert all(isinstance(v, str) and v for v in body["error"].values()), body

    return error_shape


def closed_without_credential(ctx: CheckContext, response: Response, case: Case) -> None:
    assert response.status_code >= 400, f"{case.operation.label} answered {response.status_code} without credential"


def checks_for(target: Target, label: str, credential: bool) -> list[Callable[..., Any]]:
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        error_shape(target),
    ]
    if not credential and label not in target.open:
        checks.append(closed_without_credential)
    return checks


def fuzz(target: Target, label: str, credential: bool) -> None:
    checks = checks_for(target, label, credential)
    statuses: set[int] = set()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(target, label, credential))
    def run(case: Case) -> None:
        response = case.call()
        statuses.add(response.status_code)
        case.validate_response(response, checks=checks)

    run()
    assert statuses and max(statuses) < 500, statuses
    target.alive()


# --- P2 --------------------------------------------------------------------------------------
# Schemathesis' pytest plugin ends every ASGI lifespan when a test ends, so each test gets its own
# service, started over a copy of a data directory prepared once per module (a P2 restart).


@pytest.fixture(scope="module")
def cloud_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[CloudModel, Path]:
    """P2's data directory with the tiny Llama pushed as DEPLOYMENT and OTHER_DEPLOYMENT."""
    root = tmp_path_factory.mktemp("cloud")
    model = build_cloud_model(root)
    with serve(root / "data") as client:
        for deployment_id in (DEPLOYMENT, OTHER_DEPLOYMENT):
            reply = push(client, *model.push_body(deployment_id), deployment_id=deployment_id)
            assert reply.status_code == 200, reply.text
        reply = push(client, *model.v1.body(model.signer, deployment_id=VICTIM), deployment_id=VICTIM)
        assert reply.status_code == 200, reply.text
    return model, root / "data"


@pytest.fixture
def cloud(cloud_data: tuple[CloudModel, Path], tmp_path: Path) -> Iterator[Target]:
    model, template = cloud_data
    shutil.copytree(template, tmp_path / "data")
    app = create_cloud(cloud_settings(tmp_path / "data", max_body_bytes=1 << 20))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the lifespan
    target = Target(schema, {}, {}, OPEN + P2_PUBLIC)
    deadline = time.monotonic() + 30
    while target.call("GET /health/ready").status_code != 200:
        assert time.monotonic() < deadline, "P2 not ready"
        time.sleep(0.01)
    credential = model.credential()
    push_label = "PUT /v1/deployments/{deployment_id}/weights"
    pushes = (push_label, DELETE_DEPLOYMENT)
    target.tokens = {label: PUSH_TOKEN if label in pushes else credential for label in CLOUD_OPERATIONS}
    target.victims[DELETE_DEPLOYMENT] = {"deployment_id": VICTIM}
    forward = "POST /v1/deployments/{deployment_id}/forward"
    request, expected = model.valid_request()

    def forward_reference() -> torch.Tensor:
        reply = target.call(
            forward,
            path_parameters={"deployment_id": DEPLOYMENT},
            headers=_bearer(credential),
            body=request,
            media_type=wire.CONTENT_TYPE,
        )
        assert reply.status_code == 200, reply.text
        return model.logits_of(reply.content)

    first = forward_reference()
    assert max_abs_diff(first, expected) <= 1e-4

    def alive() -> None:
        assert torch.equal(forward_reference(), first)

    sessions = "POST /v1/deployments/{deployment_id}/sessions"
    created = target.call(sessions, path_parameters={"deployment_id": DEPLOYMENT}, headers=_bearer(credential))
    assert created.status_code == 201, created.text
    g = torch.Generator().manual_seed(3)
    target.path_parameters = {"deployment_id": DEPLOYMENT, "session_id": created.json()["session_id"]}
    forward_bodies = [
        request,
        wire.encode({INPUTS_EMBEDS: torch.randn(1, 1, D, generator=g)}),
        wire.encode({INPUTS_EMBEDS: torch.randn(2, 3, D, generator=g).to(torch.bfloat16)}),
        wire.encode(
            {INPUTS_EMBEDS: torch.randn(3, 4, D, generator=g), ATTENTION_MASK: torch.tensor([[1, 1, 0, 1]] * 3)}
        ),
    ]
    target.bodies[forward] = [(body, {}) for body in forward_bodies]
    body, digest = model.push_body()  # the active version again: 200, unchanged
    target.bodies[push_label] = [(body, {DIGEST_HEADER: digest})]
    target.alive = alive
    target.secrets = (PUSH_TOKEN, credential, model.credential(OTHER_DEPLOYMENT))
    try:
        yield target
    finally:
        shutdown_lifespans()


# --- P1 --------------------------------------------------------------------------------------


def _bundle_manifest(content: bytes) -> dict[str, Any]:
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:") as tar:
        member = tar.extractfile("stip.json")
        assert member is not None
        return dict(json.loads(member.read()))


@dataclass(frozen=True)
class DeveloperData:
    data_dir: Path
    model_dir: Path
    model_id: str
    deployment_id: str
    credential: str
    other_user: str  # a second credential's user id, to revoke
    victim: str  # a second deployment, for DELETE


@pytest.fixture(scope="module")
def developer_data(tmp_path_factory: pytest.TempPathFactory) -> DeveloperData:
    """P1's data directory: the tiny Llama registered, deployed to the fake P2, one user credential."""
    root = tmp_path_factory.mktemp("developer")
    model_dir = developer_model_dir(root)
    app = create_developer(developer_settings(root / "data"), transport=FakeCloud().transport)
    with TestClient(app) as client:
        deployment = deploy(client, model_dir)
        victim = deploy(client, model_dir)
        assert deployment["status"] == victim["status"] == "active", deployment
        credential = issue(client, deployment["deployment_id"], name="alice")
        issue(client, deployment["deployment_id"], name="bob")
        users = client.get(f"/v1/deployments/{deployment['deployment_id']}/users", headers=admin()).json()
    bob = next(u["user_id"] for u in users if u["name"] == "bob")
    return DeveloperData(
        root / "data",
        model_dir,
        deployment["model_id"],
        deployment["deployment_id"],
        credential,
        bob,
        victim["deployment_id"],
    )


@pytest.fixture
def developer(developer_data: DeveloperData, tmp_path: Path) -> Iterator[Target]:
    d = developer_data
    shutil.copytree(d.data_dir, tmp_path / "data")
    app = create_developer(developer_settings(tmp_path / "data"), transport=FakeCloud().transport)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the lifespan
    service = app.state.service
    user_key = "GET /v1/deployments/{deployment_id}/user-key"
    target = Target(schema, {**dict.fromkeys(DEVELOPER_OPERATIONS, ADMIN), user_key: d.credential}, {}, OPEN)

    def alive() -> None:
        status = service.wait(d.deployment_id, timeout_s=60)  # a fuzzed rotation may be running
        reply = target.call(user_key, path_parameters={"deployment_id": d.deployment_id}, headers=_bearer(d.credential))
        assert reply.status_code == 200, reply.text
        manifest = _bundle_manifest(reply.content)
        assert manifest["deployment_id"] == d.deployment_id and manifest["key_version"] == status.key_version
        assert reply.headers[api.FINGERPRINT_HEADER.lower()] == [manifest["fingerprint"]]
        models = target.call("GET /v1/models", headers=_bearer(ADMIN))
        assert d.model_id in {m["model_id"] for m in models.json()}

    def with_model(case: Case) -> Case:
        if isinstance(case.body, dict) and "model_id" in case.body:
            case.body["model_id"] = d.model_id
        return case

    alive()
    target.path_parameters = {"deployment_id": d.deployment_id, "model_id": d.model_id, "user_id": d.other_user}
    target.victims[DELETE_DEPLOYMENT] = {"deployment_id": d.victim}  # DELETE /v1/models: 409, both use it
    target.bodies["POST /v1/models"] = [({"path": str(d.model_dir)}, {}), ({"path": str(d.model_dir), "name": "b"}, {})]
    target.bodies["POST /v1/deployments"] = [({"model_id": d.model_id, "cloud_url": CLOUD_URL}, {})]
    target.tweaks["POST /v1/deployments"] = with_model
    target.alive = alive
    target.secrets = (ADMIN, PUSH, d.credential)
    try:
        yield target
        service.wait(d.deployment_id, timeout_s=60)
    finally:
        shutdown_lifespans()


OPERATIONS = [("cloud", label) for label in CLOUD_OPERATIONS] + [("developer", label) for label in DEVELOPER_OPERATIONS]


@pytest.mark.parametrize("credential", [True, False], ids=["credential", "anonymous"])
@pytest.mark.parametrize(("service", "label"), OPERATIONS)
def test_operation(service: str, label: str, credential: bool, request: pytest.FixtureRequest) -> None:
    """Every operation of P2 (the `cloud` fixture) and P1 (`developer`), with and without a credential."""
    fuzz(request.getfixturevalue(service), label, credential)


def test_the_safetensors_bodies_are_in_the_spec(cloud: Target) -> None:
    spec = cloud.schema.raw_schema
    for path, method in (
        ("/v1/deployments/{deployment_id}/forward", "post"),
        ("/v1/deployments/{deployment_id}/weights", "put"),
    ):
        body = spec["paths"][path][method]["requestBody"]
        assert body["required"] is True
        assert body["content"] == {wire.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}
    ok = spec["paths"]["/v1/deployments/{deployment_id}/forward"]["post"]["responses"]["200"]
    assert wire.CONTENT_TYPE in ok["content"]


# --- inputs that broke a service, kept as regressions -------------------------------------------


def explicit(target: Target, label: str, status: int, **kwargs: Any) -> Response:
    """One hand-made case of `label`, with its credential, through the same checks as the fuzzing."""
    method, path = label.split(" ", 1)
    headers = {**_bearer(target.tokens[label]), **kwargs.pop("headers", {})}
    case = target.schema[path][method].Case(headers=headers, **kwargs)
    response = case.call()
    case.validate_response(response, checks=checks_for(target, label, credential=True))
    assert response.status_code == status, response.text
    return response


def test_found_inputs_p1(developer: Target, tmp_path: Path) -> None:
    register = "POST /v1/models"
    # found by the run above: Path.expanduser raised RuntimeError for `~` and a user that does not exist
    explicit(developer, register, 400, body={"path": "~no-such-user-of-stip/model"})
    # by hand: model directories whose config.json or index the family code could not read (500s)
    llama = json.loads((Path(developer.bodies[register][0][0]["path"]) / "config.json").read_text())
    weights = Path(developer.bodies[register][0][0]["path"]) / "model.safetensors"
    for name, config, index in (
        ("string width", {**llama, "hidden_size": "32"}, None),
        ("zero heads", {**llama, "num_attention_heads": 0}, None),
        ("architectures not a list", {**llama, "architectures": "LlamaForCausalLM"}, None),
        ("architectures of numbers", {**llama, "architectures": [5]}, None),
        ("weight_map a list", llama, {"weight_map": ["model.safetensors"]}),
        ("weight_map to numbers", llama, {"weight_map": {"lm_head.weight": 1}}),
        ("index not an object", llama, [1]),
    ):
        model = tmp_path / name.replace(" ", "-")
        model.mkdir()
        (model / "config.json").write_text(json.dumps(config))
        if index is None:
            shutil.copyfile(weights, model / "model.safetensors")
        else:
            (model / "model.safetensors.index.json").write_text(json.dumps(index))
        reply = explicit(developer, register, 400, body={"path": str(model)})
        assert reply.json()["error"]["code"] == api.E_BAD_INPUT, name
    developer.alive()


def test_found_inputs_p2(cloud: Target) -> None:
    body, _ = cloud.bodies["PUT /v1/deployments/{deployment_id}/weights"][0]
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + n])
    first = next(name for name in header if name != "__metadata__")
    header[first]["dtype"] = ["F32"]  # unhashable: `dtype not in DTYPES` raised TypeError (500)
    text = json.dumps(header).encode()
    bad = struct.pack("<Q", len(text)) + text + body[8 + n :]
    reply = explicit(
        cloud,
        "PUT /v1/deployments/{deployment_id}/weights",
        400,
        path_parameters={"deployment_id": DEPLOYMENT},
        headers={DIGEST_HEADER: hashlib.sha256(bad).hexdigest()},
        body=bad,
        media_type=wire.CONTENT_TYPE,
    )
    assert "dtype" in reply.json()["error"]["message"]
    cloud.alive()
