"""What P2 checks before a vLLM server sees θ′, and which families the vllm engine takes: no
engine process is started here (the checks run on the header and the meta-device class)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cloud_service.engines import VLLM_FAMILIES, load_model, validate_checkpoint
from cloud_service.engines.vllm import CPU_HEAD_SIZES
from cloud_service.errors import BadInput
from cloud_service.schemas import PushManifest
from shared.checkpoint import transform_model_dir
from shared.runtime import CloudModel
from tests.cloud_service.helpers import settings_for
from tests.support import random_causal_lm
from tests.vllm.models import CONFIG

CPU = torch.device("cpu")
GPT2 = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=61, n_embd=32, n_layer=2, n_head=4)


def transformed(tmp: Path, config: dict, mode: str = "embeds") -> tuple[Path, PushManifest]:
    """θ′ of a random model as one safetensors file, and the manifest P2 would read from its push."""
    model_dir = tmp / "model"
    random_causal_lm(config, seed=2).save_pretrained(model_dir)
    result = transform_model_dir(model_dir, tmp / "out", progress=False, mode=mode)
    tensors: dict[str, torch.Tensor] = {}
    for path in result.cloud_files:
        tensors |= load_file(str(path))
    theta = tmp / "theta.safetensors"
    save_file(tensors, str(theta))
    cloud_config = json.loads((result.out_dir / "cloud" / "config.json").read_text())
    return theta, PushManifest(
        "dep", result.family, cloud_config, 1, "key", mode="token" if mode == "token" else "embeds"
    )


def edited(theta: Path, drop: str | None = None, reshape: str | None = None) -> Path:
    tensors = load_file(str(theta))
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    out = theta.with_name("edited.safetensors")
    save_file(tensors, str(out))
    return out


def test_a_complete_theta_passes_and_every_defect_is_named(tmp_path: Path) -> None:
    theta, manifest = transformed(tmp_path, CONFIG)
    validate_checkpoint(theta, manifest, device=CPU)  # embeds mode: the token table may be absent
    for name in ("model.layers.0.self_attn.k_proj.weight", "lm_head.weight", "model.norm.weight"):
        with pytest.raises(BadInput, match="missing") as e:
            validate_checkpoint(edited(theta, drop=name), manifest, device=CPU)
        assert name in e.value.message
    with pytest.raises(BadInput, match="wrong shape") as e:
        validate_checkpoint(edited(theta, reshape="model.layers.1.mlp.up_proj.weight"), manifest, device=CPU)
    assert "model.layers.1.mlp.up_proj.weight" in e.value.message


def test_token_mode_needs_the_table(tmp_path: Path) -> None:
    theta, manifest = transformed(tmp_path, CONFIG, mode="token")
    validate_checkpoint(theta, manifest, device=CPU)
    with pytest.raises(BadInput, match="model.embed_tokens.weight"):
        validate_checkpoint(edited(theta, drop="model.embed_tokens.weight"), manifest, device=CPU)


def test_a_head_size_the_cpu_build_cannot_run_is_refused_before_a_server_starts(tmp_path: Path) -> None:
    """Head size 16 (hidden 64, 4 heads): vLLM's CPU attention has no kernel for it; a GPU backend may."""
    theta, manifest = transformed(tmp_path, dict(CONFIG, hidden_size=64, intermediate_size=96))
    assert manifest.config["hidden_size"] // manifest.config["num_attention_heads"] == 16
    with pytest.raises(BadInput, match="head size is 16") as e:
        validate_checkpoint(theta, manifest, device=CPU)
    assert ", ".join(map(str, CPU_HEAD_SIZES)) in e.value.message
    assert "STIP_CLOUD_ENGINE=transformers" in e.value.message
    validate_checkpoint(theta, manifest, device=torch.device("cuda"))  # the head-size check is the CPU's only
    python = tmp_path / "python"  # an environment that exists: the refusal comes before any start
    python.touch()
    settings = settings_for(tmp_path / "data", engine="vllm", vllm_python=python)
    with pytest.raises(BadInput, match="head size is 16"):
        load_model(settings, manifest, theta, CPU, work_dir=tmp_path / "engine")
    assert not (tmp_path / "engine").exists()  # no server was prepared


def test_other_families_stay_on_the_transformers_engine(tmp_path: Path) -> None:
    assert set(VLLM_FAMILIES) == {"llama"}
    theta, manifest = transformed(tmp_path, GPT2)
    settings = settings_for(tmp_path / "data", engine="vllm", vllm_python=tmp_path / "no-such-python")
    model = load_model(settings, manifest, theta, torch.device("cpu"), work_dir=tmp_path / "engine")
    assert isinstance(model, CloudModel) and model.family.name == "gpt2"
    assert not (tmp_path / "engine").exists()  # no vLLM server was prepared


def test_a_missing_vllm_environment_names_the_make_target(tmp_path: Path) -> None:
    theta, manifest = transformed(tmp_path, CONFIG)
    settings = settings_for(tmp_path / "data", engine="vllm", vllm_python=tmp_path / "no-such-python")
    with pytest.raises(Exception, match="make vllm-env"):
        load_model(settings, manifest, theta, torch.device("cpu"), work_dir=tmp_path / "engine")
