"""Fixtures of the SDK tests: tiny randomised models and the real all-MiniLM-L6-v2, transformed
once per session with the shared core, served by the fake P1 and P2 of `fakes.py`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from shared.checkpoint import TransformResult, transform_model_dir
from shared.runtime import CloudModel, load_cloud_model
from stip_demo.models import WORDPIECE, copy_tokenizer, minilm_path
from tests.support import randomize_parameters
from tests.user_client.fakes import (
    CloudState,
    DeveloperState,
    SyncASGITransport,
    cloud_app,
    developer_app,
)
from user_client import StipClient

CREDENTIAL = "user-credential-for-tests"
DEVELOPER_URL = "http://developer.test"
CLOUD_URL = "http://cloud.test"
VOCAB = WORDPIECE["vocab_size"]  # the MiniLM tokenizer's vocabulary, shared by the tiny decoders
SEP = WORDPIECE["eos_token_id"]  # [SEP]: the tiny decoders' EOS


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


def _save_decoder(model: Any, out: Path) -> Path:
    model.save_pretrained(out)
    copy_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dims = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlamaConfig(**WORDPIECE, **dims, **heads, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = randomize_parameters(transformers.LlamaForCausalLM(config), scale=0.2, seed=1)
    return _save_decoder(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.GPT2Config(**WORDPIECE, n_positions=48, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = randomize_parameters(transformers.GPT2LMHeadModel(config), scale=0.2, seed=2)
    return _save_decoder(model, tmp_path_factory.mktemp("gpt2"))


def _transform(model_dir: Path, out: Path, version: int) -> TransformResult:
    return transform_model_dir(model_dir, out, key_version=version, progress=False)


def _cloud(result: TransformResult) -> CloudModel:
    config = json.loads((result.out_dir / "cloud" / "config.json").read_text())
    return load_cloud_model(config, result.cloud_files, family=result.family)


@dataclass
class Transformed:
    results: dict[str, dict[int, TransformResult]]  # deployment -> version -> result
    models: dict[str, dict[int, CloudModel]]


@pytest.fixture(scope="session")
def transformed(
    tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, gpt2_dir: Path, minilm_dir: Path
) -> Transformed:
    root = tmp_path_factory.mktemp("transformed")
    plan = {"llama": (llama_dir, (1, 2)), "gpt2": (gpt2_dir, (1,)), "minilm": (minilm_dir, (1,))}
    results: dict[str, dict[int, TransformResult]] = {}
    for dep, (src, versions) in plan.items():
        results[dep] = {v: _transform(src, root / f"{dep}-v{v}", v) for v in versions}
    models = {dep: {v: _cloud(r) for v, r in by_v.items()} for dep, by_v in results.items()}
    return Transformed(results=results, models=models)


@dataclass
class World:
    """Fake P1 + P2 serving the transformed models; `client()` builds a StipClient on them."""

    developer: DeveloperState
    cloud: CloudState
    developer_transport: SyncASGITransport
    cloud_transport: SyncASGITransport
    cache_dir: Path
    transformed: Transformed

    def client(self, deployment_id: str = "llama", **kw: Any) -> StipClient:
        args: dict[str, Any] = dict(
            deployment_id=deployment_id,
            credential=CREDENTIAL,
            cache_dir=self.cache_dir,
            developer_transport=self.developer_transport,
            cloud_transport=self.cloud_transport,
            backoff=0.0,
        )
        args.update(kw)
        return StipClient(DEVELOPER_URL, **args)

    def rotate(self, deployment_id: str = "llama", version: int = 2, *, p1: bool = True) -> None:
        """P2 activates `version`; P1 hands it out too unless `p1=False`."""
        self.cloud.active[deployment_id] = version
        if p1:
            self.developer.current[deployment_id] = version


@pytest.fixture
def world(transformed: Transformed, tmp_path: Path) -> Iterator[World]:
    developer = DeveloperState(credential=CREDENTIAL, cloud_url=CLOUD_URL)
    cloud = CloudState(credential=CREDENTIAL)
    for dep, by_version in transformed.results.items():
        developer.bundles[dep] = {v: r.out_dir / "user" for v, r in by_version.items()}
        developer.current[dep] = 1
        cloud.models[dep] = transformed.models[dep]
        cloud.active[dep] = 1
    dt = SyncASGITransport(developer_app(developer))
    ct = SyncASGITransport(cloud_app(cloud))
    try:
        yield World(developer, cloud, dt, ct, tmp_path / "cache", transformed)
    finally:
        dt.shutdown()
        ct.shutdown()


@pytest.fixture
def make_client(world: World) -> Iterator[Callable[..., StipClient]]:
    clients: list[StipClient] = []

    def make(deployment_id: str = "llama", **kw: Any) -> StipClient:
        client = world.client(deployment_id, **kw)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def reference_model(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
