"""Fixtures for P2's tests: a tiny random Llama, its transform under two key versions, a
signer standing in for P1, and a P2 serving key version 1."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import transformers
from fastapi.testclient import TestClient

from shared.credentials import Signer
from tests.cloud_service.helpers import CONFIG, DEPLOYMENT, Deployed, serving
from tests.support import random_causal_lm


@pytest.fixture(scope="session")
def original() -> transformers.PreTrainedModel:
    return random_causal_lm(CONFIG, seed=1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, original: transformers.PreTrainedModel) -> Path:
    path = tmp_path_factory.mktemp("llama")
    original.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def v1(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Deployed:
    # small shards: the push concatenates several files into one body
    return Deployed.transform(model_dir, tmp_path_factory.mktemp("v1") / "out", 1, shard_bytes=20_000)


@pytest.fixture(scope="session")
def v2(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Deployed:
    return Deployed.transform(model_dir, tmp_path_factory.mktemp("v2") / "out", 2)


@pytest.fixture(scope="session")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def credential(signer: Signer) -> str:
    token, _ = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)
    return token


@pytest.fixture
def deployed(tmp_path: Path, v1: Deployed, signer: Signer) -> Iterator[TestClient]:
    """A P2 serving key version 1 of the tiny Llama."""
    with serving(tmp_path / "data", v1, signer) as client:
        yield client
