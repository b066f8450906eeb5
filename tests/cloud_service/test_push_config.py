"""A push's config.json describes one network and chooses no code.

Two attacks from a review (issue 10, item 6), each refused here:
- a config whose `architectures` names one family and whose `model_type` names another: the
  embedding check follows the first, the stock class the second, so a GPT-2 model labelled
  Llama carried its token table (`transformer.wte`) onto P2;
- config keys that select code: an `attn_implementation` naming a hub kernel reached
  transformers' kernel loader, and `auto_map` / `quantization_config` / `*_implementation` must
  never be honoured. They are dropped before transformers sees the config.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import transformers.modeling_utils
from safetensors.torch import save_file

from shared import wire
from shared.api import (
    E_BAD_INPUT,
    E_NOT_FOUND,
    PUSH_CONFIG,
    PUSH_DEPLOYMENT,
    PUSH_FAMILY,
    PUSH_KEY_VERSION,
    PUSH_VERIFY_KEY,
)
from shared.checkpoint import transform_model_dir
from shared.credentials import Signer
from shared.families.base import stock_config
from shared.permutation import unpermute
from tests.cloud_service.helpers import DEPLOYMENT, Deployed, assert_error, embeds, forward, push, serve
from tests.support import TINY_LLAMA, max_abs_diff, randomize_parameters

HUB_KERNEL = "kernels-community/flash-attn"
CODE_KEYS: dict[str, Any] = {
    "attn_implementation": HUB_KERNEL,
    "experts_implementation": "kernels-community/moe",
    "_attn_implementation": HUB_KERNEL,
    "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
    "trust_remote_code": True,
    "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True},
}


def _body(files: list[Path], config: dict[str, Any], signer: Signer, family: str) -> tuple[bytes, str]:
    metadata = {
        PUSH_DEPLOYMENT: DEPLOYMENT,
        PUSH_FAMILY: family,
        PUSH_CONFIG: json.dumps(config),
        PUSH_KEY_VERSION: "1",
        PUSH_VERIFY_KEY: signer.public_key,
    }
    _, chunks = wire.concat_files(files, metadata)
    body = b"".join(chunks)
    return body, hashlib.sha256(body).hexdigest()


@pytest.fixture
def kernel_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of transformers' hub-kernel loader (refused, as a loader with no hub would be)."""
    calls: list[str] = []

    def loader(name: str, *args: Any, **kwargs: Any) -> None:
        calls.append(name)
        raise RuntimeError(f"the hub kernel loader was reached for {name!r}")

    monkeypatch.setattr(transformers.modeling_utils, "lazy_import_flash_attention", loader)
    return calls


def test_a_gpt2_model_labelled_llama_cannot_put_its_token_table_on_p2(tmp_path: Path, signer: Signer) -> None:
    gpt2 = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = randomize_parameters(transformers.GPT2LMHeadModel(gpt2), seed=3)
    model.save_pretrained(tmp_path / "gpt2")
    out = transform_model_dir(tmp_path / "gpt2", tmp_path / "out", progress=False)
    table = tmp_path / "wte.safetensors"
    wte = model.transformer.wte.weight.detach().clone()
    assert bool(wte.any())
    save_file({"transformer.wte.weight": wte}, str(table))
    config = json.loads((out.out_dir / "cloud" / "config.json").read_text())
    config |= {  # read as Llama by the family (dims, embedding names), built as GPT-2 from model_type
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 2,
    }
    assert config["model_type"] == "gpt2"
    body, digest = _body([*out.cloud_files, table], config, signer, "llama")
    with serve(tmp_path / "data") as client:
        message = assert_error(push(client, body, digest), 422, E_BAD_INPUT)  # UnsupportedModel, as on P1
        assert "same model family" in message and "gpt2" in message, message
        assert_error(client.get(f"/v1/deployments/{DEPLOYMENT}"), 404, E_NOT_FOUND)
        assert not list((tmp_path / "data" / "tmp").iterdir())


def test_config_keys_that_choose_code_never_reach_transformers(
    tmp_path: Path, v1: Deployed, signer: Signer, original: transformers.PreTrainedModel, kernel_loads: list[str]
) -> None:
    config = json.loads((v1.result.out_dir / "cloud" / "config.json").read_text()) | CODE_KEYS
    body, digest = _body(v1.result.cloud_files, config, signer, "llama")
    token, _ = signer.issue(subject="alice", deployment_id=DEPLOYMENT, ttl_s=3600)  # outlives a slow push
    with serve(tmp_path / "data") as client:
        reply = push(client, body, digest)
        assert reply.status_code == 200, reply.text
        assert kernel_loads == []
        loaded = client.app.state.service.deployment(DEPLOYMENT).model.model.config  # type: ignore[attr-defined]
        assert loaded._attn_implementation in ("sdpa", "eager")
        assert not hasattr(loaded, "auto_map") and not hasattr(loaded, "quantization_config")
        # and the stripped config still runs the same network, exactly
        ids = torch.tensor([[3, 14, 15, 9, 2]])
        reply = forward(client, token, embeds(original, ids, v1.pi), output="all")
        assert reply.status_code == 200, reply.text
        logits = unpermute(wire.decode(reply.content)[0]["logits"], v1.pi_c)
        with torch.no_grad():
            assert max_abs_diff(original(input_ids=ids).logits, logits) <= 1e-4


def test_the_kernel_loader_is_reached_without_the_allowlist(kernel_loads: list[str]) -> None:
    """Positive control: the probe above does see the loader when transformers gets the key."""
    config = transformers.AutoConfig.for_model(**dict(TINY_LLAMA, attn_implementation=HUB_KERNEL))
    with pytest.raises(RuntimeError, match="hub kernel loader"):
        transformers.AutoModelForCausalLM.from_config(config)
    assert kernel_loads == [HUB_KERNEL]


def test_stock_config_keeps_the_network_and_drops_the_code() -> None:
    config = dict(TINY_LLAMA, rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": 2.0}, **CODE_KEYS)
    config["torch_dtype"] = "float32"
    cfg = stock_config(config)
    assert isinstance(cfg, transformers.LlamaConfig)
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (32, 2, 61)
    assert cfg.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    assert cfg._attn_implementation is None and cfg._experts_implementation is None
    for key in ("auto_map", "trust_remote_code", "quantization_config"):
        assert not hasattr(cfg, key), key
    gpt2 = stock_config({"model_type": "gpt2", "hidden_size": 48, "num_attention_heads": 4})  # aliases kept
    assert (gpt2.n_embd, gpt2.n_head) == (48, 4)
    with pytest.raises(Exception, match="model_type"):
        stock_config({"model_type": "no-such-model"})
