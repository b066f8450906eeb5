"""Streaming checkpoint transform: layout, loadability, memory bound, and clean failures."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import shared.checkpoint as checkpoint
from shared.checkpoint import transform_model_dir
from shared.errors import CheckpointError, UnsupportedModel
from shared.families import get_family
from shared.keys import DeveloperKey, UserKey
from shared.permutation import permute, unpermute
from shared.runtime import load_cloud_model
from tests.support import TINY_LLAMA, random_causal_lm, randomize_parameters

CONFIG = dict(TINY_LLAMA, num_hidden_layers=3, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("model")
    model = random_causal_lm(CONFIG)
    model.save_pretrained(path, max_shard_size="20KB")  # several input shards + an index
    (path / "tokenizer_config.json").write_text("{}")
    (path / "README.md").write_text("not copied")
    return path, model


def test_layout_and_exactness(model_dir, tmp_path: Path) -> None:
    src, model = model_dir
    assert (src / checkpoint.INDEX).exists()
    result = transform_model_dir(src, tmp_path / "out", shard_bytes=30_000, progress=False)
    out = tmp_path / "out"
    cloud_files = sorted((out / "cloud").glob("*.safetensors"))
    assert len(cloud_files) > 1 and (out / "cloud" / checkpoint.INDEX).exists()
    assert sorted(p.name for p in (out / "user").iterdir()) == [
        "config.json",
        "embedding.safetensors",
        "generation_config.json",
        "key.safetensors",
        "stip.json",
        "tokenizer_config.json",
    ]
    dev_key = out / "developer" / "key.safetensors"
    assert stat.S_IMODE(os.stat(dev_key).st_mode) == 0o600
    assert DeveloperKey.load(dev_key).user.fingerprint == result.key.user.fingerprint
    user_key = UserKey.load(out / "user" / "key.safetensors")
    manifest = json.loads((out / "user" / "stip.json").read_text())
    assert manifest["fingerprint"] == user_key.fingerprint and manifest["family"] == "llama"

    # The cloud checkpoint holds θ′ only: no embedding module and no permutation. With a tied
    # head the cloud's head is πᵀ E π_c by design (the protocol), never E itself.
    cloud: dict[str, torch.Tensor] = {}
    for f in cloud_files:
        cloud.update(load_file(str(f)))
    embedding = model.get_input_embeddings().weight.detach()
    assert "model.embed_tokens.weight" not in cloud
    assert [n for n, t in cloud.items() if t.shape == embedding.shape] == ["lm_head.weight"]
    assert not torch.equal(cloud["lm_head.weight"], embedding)
    assert all(t.dtype.is_floating_point for t in cloud.values())  # no index vector travels

    # The stock class's from_pretrained loads the cloud dir, and θ′ on x·π is exact.
    stock = transformers.AutoModelForCausalLM.from_pretrained(out / "cloud").eval()
    cm = load_cloud_model(json.loads((out / "cloud" / "config.json").read_text()), cloud_files)
    fam = get_family("llama")
    ids = torch.randint(0, 61, (2, 9))
    x = permute(fam.embed(load_file(str(out / "user" / "embedding.safetensors")), CONFIG, ids), user_key.pi)
    with torch.no_grad():
        ref = model(ids).logits
        via_stock = unpermute(stock(inputs_embeds=x).logits, user_key.pi_c)
    via_runtime = unpermute(cm.forward(x).output, user_key.pi_c)
    assert (via_stock - ref).abs().max() <= 1e-4
    assert (via_runtime - ref).abs().max() <= 1e-4


def test_peak_buffer_is_bounded_by_a_shard(model_dir, tmp_path: Path, monkeypatch) -> None:
    src, model = model_dir
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    shard = 20_000
    seen: list[int] = []
    real_save = checkpoint.save_file

    def spy(tensors, path, metadata=None):
        if "shard-" in str(path):
            seen.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", spy)
    transform_model_dir(src, tmp_path / "out", shard_bytes=shard, progress=False)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(seen) >= 3 and max(seen) < shard + largest < total


def _assert_nothing_left(parent: Path, name: str = "out") -> None:
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))) == []


def _bad_dir(tmp_path: Path, config: dict | None = None) -> Path:
    """A new model directory `tmp_path/model`, with `config` as its config.json."""
    bad = tmp_path / "model"
    bad.mkdir()
    if config is not None:
        (bad / "config.json").write_text(json.dumps(config))
    return bad


def _assert_refused(src: Path, tmp_path: Path, error: type[Exception], match: str) -> None:
    """Transforming `src` into `tmp_path/out` raises `error` and leaves no output behind."""
    with pytest.raises(error, match=match):
        transform_model_dir(src, tmp_path / "out", progress=False)
    _assert_nothing_left(tmp_path)


def test_missing_config(tmp_path: Path) -> None:
    _assert_refused(_bad_dir(tmp_path), tmp_path, CheckpointError, "no config.json")


def test_unknown_architecture(model_dir, tmp_path: Path) -> None:
    bad = _bad_dir(tmp_path, {"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    _assert_refused(bad, tmp_path, UnsupportedModel, "supported: .*LlamaForCausalLM")


def test_truncated_shard_leaves_nothing(model_dir, tmp_path: Path) -> None:
    src, _ = model_dir
    bad = _bad_dir(tmp_path)
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    last = sorted(bad.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    _assert_refused(bad, tmp_path, CheckpointError, last.name)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = _bad_dir(tmp_path, CONFIG)
    state = {"model.embed_tokens.weight": torch.zeros(61, 32), "model.layers.0.mlp.up_proj.weight": torch.zeros(47, 32)}
    save_file(state, str(bad / "model.safetensors"))
    _assert_refused(bad, tmp_path, CheckpointError, r"model.layers.0.mlp.up_proj.weight.*\(47, 32\)")


def test_missing_shard_and_existing_output(model_dir, tmp_path: Path) -> None:
    src, _ = model_dir
    bad = _bad_dir(tmp_path, CONFIG)
    (bad / checkpoint.INDEX).write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="lacks the shards"):
        transform_model_dir(bad, tmp_path / "out", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(CheckpointError, match="not empty"):
        transform_model_dir(src, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep"


def _stock_cloud_output(family: str, cloud_dir: Path, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Load OUT/cloud with the stock class's own from_pretrained and run it on x·π."""
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel.from_pretrained(cloud_dir).eval()
        assert torch.count_nonzero(model.transformer.wpe.weight) == 0  # P2's position table is all zero
        return model(inputs_embeds=x, attention_mask=mask).logits
    model = transformers.BertModel.from_pretrained(cloud_dir).eval()
    return get_family("bert").cloud_forward(model, x, mask).output  # its encoder, fed x·π directly


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_cloud_dir_loads_with_the_stock_from_pretrained(family: str, tmp_path: Path) -> None:
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        original = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        )
        original = transformers.BertModel(config)
    randomize_parameters(original)
    original.save_pretrained(tmp_path / "model")
    result = transform_model_dir(tmp_path / "model", tmp_path / "out", progress=False)
    fam = get_family(family)
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    embedding = load_file(str(tmp_path / "out" / "user" / "embedding.safetensors"))
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    x = permute(fam.embed(embedding, cfg, ids), result.key.pi)
    with torch.no_grad():
        got = unpermute(_stock_cloud_output(family, tmp_path / "out" / "cloud", x, mask), result.key.pi_c)
        ref = original(ids, attention_mask=mask)
        ref = ref.logits if family == "gpt2" else ref.last_hidden_state
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-4
