"""Helpers for P2's tests: the tiny Llama's config, push bodies, an in-process P2 (FastAPI
TestClient with its lifespan) over a temporary data directory, and request shortcuts."""

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from fastapi.testclient import TestClient

from cloud_service.app import create_app
from cloud_service.settings import CloudSettings
from shared import wire
from shared.api import (
    DIGEST_HEADER,
    INPUTS_EMBEDS,
    KEY_VERSION_HEADER,
    PUSH_CONFIG,
    PUSH_DEPLOYMENT,
    PUSH_FAMILY,
    PUSH_KEY_VERSION,
    PUSH_VERIFY_KEY,
)
from shared.checkpoint import TransformResult, transform_model_dir
from shared.credentials import Signer
from shared.permutation import permute
from tests.support import TINY_LLAMA

Reply = Any  # the TestClient's response (httpx's interface)
PUSH_TOKEN = "push-token-for-tests-0123456789"
DEPLOYMENT = "dep-llama"
CONFIG: dict[str, Any] = dict(TINY_LLAMA, max_position_embeddings=24)
D, V = CONFIG["hidden_size"], CONFIG["vocab_size"]  # model width, vocabulary


@dataclass
class Deployed:
    """One transformed key version, ready to push."""

    result: TransformResult
    key_version: int

    @classmethod
    def transform(cls, model_dir: Path, out: Path, key_version: int, **options: Any) -> "Deployed":
        """P1's transform of `model_dir` into `out` under key version `key_version`."""
        return cls(transform_model_dir(model_dir, out, key_version=key_version, progress=False, **options), key_version)

    @property
    def pi(self) -> torch.Tensor:
        return self.result.key.pi

    @property
    def pi_c(self) -> torch.Tensor:
        return self.result.key.pi_c

    def metadata(self, signer: Signer, deployment_id: str = DEPLOYMENT, **meta: str) -> dict[str, str]:
        """The push body's metadata (P1's), with `meta` added or changed."""
        config = json.loads((self.result.out_dir / "cloud" / "config.json").read_text())
        return {
            PUSH_DEPLOYMENT: deployment_id,
            PUSH_FAMILY: self.result.family,
            PUSH_CONFIG: json.dumps(config),
            PUSH_KEY_VERSION: str(self.key_version),
            PUSH_VERIFY_KEY: signer.public_key,
        } | meta

    def body(self, signer: Signer, deployment_id: str = DEPLOYMENT, **meta: str) -> tuple[bytes, str]:
        """The push body (wire.concat_files over the cloud shards) and its SHA-256."""
        _, chunks = wire.concat_files(self.result.cloud_files, self.metadata(signer, deployment_id, **meta))
        body = b"".join(chunks)
        return body, hashlib.sha256(body).hexdigest()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings_for(data_dir: Path, **overrides: object) -> CloudSettings:
    values: dict[str, object] = dict(
        data_dir=data_dir, push_token=PUSH_TOKEN, device="cpu", dtype="float32", log_level="DEBUG"
    )
    values.update(overrides)
    return CloudSettings(**values)  # type: ignore[arg-type]


@contextmanager
def serve(data_dir: Path, *, clock: Callable[[], float] = time.monotonic, **overrides: object) -> Iterator[TestClient]:
    """P2 in process, lifespan run, ready (its deployments reloaded)."""
    app = create_app(settings_for(data_dir, **overrides), clock=clock)
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@contextmanager
def serving(
    data_dir: Path, deployed: Deployed, signer: Signer, *, deployment_id: str = DEPLOYMENT, **overrides: object
) -> Iterator[TestClient]:
    """P2 in process (`serve`, settings overridden by `overrides`) with `deployed` pushed and active."""
    with serve(data_dir, **overrides) as client:
        body, digest = deployed.body(signer, deployment_id)
        assert push(client, body, digest, deployment_id=deployment_id).status_code == 200
        yield client


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("P2 not ready")
        time.sleep(0.01)


def push(
    client: TestClient, body: bytes, digest: str, *, token: str | None = PUSH_TOKEN, deployment_id: str = DEPLOYMENT
) -> Reply:
    headers = {DIGEST_HEADER: digest, "Content-Type": wire.CONTENT_TYPE}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.put(f"/v1/deployments/{deployment_id}/weights", content=body, headers=headers)


def forward(
    client: TestClient,
    credential: str | None,
    tensors: dict[str, torch.Tensor] | bytes,
    *,
    deployment_id: str = DEPLOYMENT,
    key_version: int | None = None,
    **params: str | int | None,
) -> Reply:
    body = tensors if isinstance(tensors, bytes) else wire.encode(tensors)
    headers = {"Content-Type": wire.CONTENT_TYPE}
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    if key_version is not None:
        headers[KEY_VERSION_HEADER] = str(key_version)
    query = {k: v for k, v in params.items() if v is not None}
    return client.post(f"/v1/deployments/{deployment_id}/forward", content=body, headers=headers, params=query)


def decoded(response: Reply) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == wire.CONTENT_TYPE
    return wire.decode(response.content)


def assert_error(response: Reply, status: int, code: str) -> str:
    """The one error shape; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"code", "message"}
    assert error["message"]
    return str(error["message"])


def embeds(original: transformers.PreTrainedModel, ids: torch.Tensor, pi: torch.Tensor) -> dict[str, torch.Tensor]:
    """P3's side: embed locally and permute by π."""
    with torch.no_grad():
        x = original.get_input_embeddings()(ids)  # (B, S, d)
    return {INPUTS_EMBEDS: permute(x, pi)}
