"""ModelConfig reads config.json's sizes as the stock transformers config classes read them."""

from typing import Any

import pytest
import transformers

from shared.errors import CheckpointError
from shared.model_config import ModelConfig


def saved(config: transformers.PretrainedConfig) -> dict[str, Any]:
    """The dict `save_pretrained` writes to config.json."""
    return config.to_dict()


@pytest.mark.parametrize(
    "stock",
    [
        transformers.LlamaConfig(
            hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=160
        ),
        transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2),
        transformers.GPT2Config(n_embd=48, n_head=3, n_layer=5, n_positions=77, vocab_size=123),
        transformers.BertConfig(hidden_size=40, num_attention_heads=5, num_hidden_layers=2, intermediate_size=72),
    ],
    ids=lambda c: c.model_type,
)
def test_sizes_as_the_stock_config_reads_them(stock: transformers.PretrainedConfig) -> None:
    cfg = ModelConfig.from_json(saved(stock))
    assert cfg.hidden_size == stock.hidden_size  # GPT-2: n_embd, through the class's attribute_map
    assert cfg.num_attention_heads == stock.num_attention_heads
    assert cfg.num_hidden_layers == stock.num_hidden_layers
    assert cfg.kv_heads == getattr(stock, "num_key_value_heads", stock.num_attention_heads)
    assert cfg.vocab_size == stock.vocab_size
    assert cfg.max_position_embeddings == stock.max_position_embeddings  # GPT-2: n_positions


def test_gqa_and_head_dim() -> None:
    stock = transformers.LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=24)
    cfg = ModelConfig.from_json(saved(stock))
    assert (cfg.kv_heads, cfg.head_dim) == (2, 24)
    assert ModelConfig.from_json({**saved(stock), "num_key_value_heads": None}).kv_heads == 6


def test_frozen() -> None:
    cfg = ModelConfig.from_json(saved(transformers.LlamaConfig()))
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"hidden_size": None}, CheckpointError, "lacks hidden_size / n_embd"),
        ({"num_hidden_layers": "2"}, TypeError, "num_hidden_layers / n_layer must be an integer, got '2'"),
        ({"vocab_size": True}, TypeError, "vocab_size must be an integer, got True"),
        ({"head_dim": 1.5}, TypeError, "head_dim must be an integer"),
        ({"num_attention_heads": 0}, ValueError, "num_attention_heads / n_head must be positive, got 0"),
    ],
)
def test_refused(change: dict[str, Any], error: type[Exception], match: str) -> None:
    config = {**saved(transformers.LlamaConfig()), **change}
    with pytest.raises(error, match=match):
        ModelConfig.from_json(config)
