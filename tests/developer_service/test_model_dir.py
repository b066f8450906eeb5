"""What of a model directory reaches users, and which directories P1 refuses (issue 10, item 2).

Every credential holder downloads the user bundle, so it carries an allowlist of the model
directory (config, generation config, tokenizer, pooling files) and nothing else: not the
original weights in another format, not code, not a symbolic link out of the directory. A
shard index that names files outside the directory, a symbolic link among the files users
would receive, and a config whose architectures and model_type name different families are
refused when the model is registered, saying why.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shared.api import E_BAD_INPUT
from shared.checkpoint import USER_FILES, transform_model_dir
from shared.errors import CheckpointError
from tests.developer_service.conftest import admin, bearer, deploy, issue, untar
from user_client import bundle as user_bundle

SECRET = b"P1's machine: nothing of this may reach a user"
# the original weights in other formats, code, and other files a model directory may hold
HOSTILE = ("rust_model.ot", "onnx/model.onnx_data", "model.npz", "flax_model.msgpack", "tf_model.h5", "modeling_x.py")
LINKS = ("notes.txt", "extra/outside")  # a symbolic link to a file outside, one to a directory outside
BUNDLE_OWN = {"key.safetensors", "embedding.safetensors", "stip.json"}


@pytest.fixture
def hostile_dir(tmp_path: Path, model_dir: Path) -> Path:
    """The tiny Llama directory with a generation config, and every kind of file users must not get."""
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    for name in HOSTILE:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(SECRET)
    (path / "notes.txt").symlink_to(outside / "secret.txt")
    (path / "extra").mkdir()
    (path / "extra" / "outside").symlink_to(outside, target_is_directory=True)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return path


def _expected(model_dir: Path) -> set[str]:
    return {n for n in USER_FILES if (model_dir / n).is_file() and not (model_dir / n).is_symlink()}


def test_the_offline_transform_copies_only_the_allowlist(hostile_dir: Path, tmp_path: Path) -> None:
    out = transform_model_dir(hostile_dir, tmp_path / "out", progress=False).out_dir
    user = {p.relative_to(out / "user").as_posix() for p in (out / "user").rglob("*") if not p.is_dir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "vocab.txt"} <= user
    assert user == _expected(hostile_dir) | BUNDLE_OWN
    assert not any(p.is_symlink() for p in (out / "user").rglob("*"))
    assert all(SECRET not in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_the_served_bundle_holds_only_the_allowlist(p1, hostile_dir: Path) -> None:  # type: ignore[no-untyped-def]
    with p1() as client:
        dep = deploy(client, hostile_dir)
        assert dep["status"] == "active", dep
        reply = client.get(
            f"/v1/deployments/{dep['deployment_id']}/user-key", headers=bearer(issue(client, dep["deployment_id"]))
        )
        assert reply.status_code == 200, reply.text
        files = untar(reply.content)
    assert set(files) == _expected(hostile_dir) | BUNDLE_OWN
    assert all(SECRET not in content for _, content in files.values())


def test_sentence_transformers_pooling_is_kept(tmp_path: Path, model_dir: Path) -> None:
    """modules.json names the pooling module's directory: its config.json is in the allowlist."""
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (path / "1_Pooling" / "weights.bin").write_bytes(SECRET)
    (path / "2_Other").mkdir()
    (path / "2_Other" / "config.json").write_text("{}")
    out = transform_model_dir(path, tmp_path / "out", progress=False).out_dir
    assert (out / "user" / "1_Pooling" / "config.json").read_text() == (path / "1_Pooling" / "config.json").read_text()
    assert (out / "user" / "modules.json").is_file()
    assert not (out / "user" / "1_Pooling" / "weights.bin").exists() and not (out / "user" / "2_Other").exists()


def _refused(p1, path: Path, *words: str, status: int = 400) -> None:  # type: ignore[no-untyped-def]
    with p1() as client:
        reply = client.post("/v1/models", json={"path": str(path)}, headers=admin())
        assert client.get("/v1/models", headers=admin()).json() == []
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == E_BAD_INPUT and all(w in error["message"] for w in words), error


@pytest.mark.parametrize("link", ["tokenizer_config.json", "1_Pooling"])
def test_a_symbolic_link_among_the_users_files_is_refused(p1, tmp_path: Path, model_dir: Path, link: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_bytes(SECRET)
    if link == "1_Pooling":
        (path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "Pooling"}]))
        (path / link).symlink_to(outside, target_is_directory=True)
    else:
        (path / link).unlink()
        (path / link).symlink_to(outside / "config.json")
    _refused(p1, path, "symbolic link", link)
    with pytest.raises(CheckpointError, match="symbolic link"):
        transform_model_dir(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/elsewhere.safetensors", "sub/../../x.safetensors"])
def test_a_shard_index_naming_files_outside_the_directory_is_refused(
    p1, tmp_path: Path, model_dir: Path, shard: str
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    (path / "model.safetensors").unlink()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))  # exists: only the name is wrong
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    _refused(p1, path, "outside the model directory", shard)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        transform_model_dir(path, tmp_path / "out", progress=False)


def test_architectures_and_model_type_of_different_families_are_refused(p1, tmp_path: Path, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    _refused(p1, path, "same model family", "gpt2", status=422)


def test_the_users_tokenizer_never_runs_remote_code(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    import transformers

    seen: list[object] = []

    def from_pretrained(path: str, **kwargs: object) -> object:
        seen.append(kwargs.get("trust_remote_code", "not given"))
        return object()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    user_bundle._load_tokenizer(model_dir)
    assert seen == [False]
