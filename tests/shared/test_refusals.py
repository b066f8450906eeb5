"""BERT's and the paper's Transformer's transforms refuse a tensor of the wrong shape, and a
name that is not theirs, by name (the other families check theirs in their own test files, with
family_checks.assert_refused_by_name)."""

from collections.abc import Callable

import pytest
import torch

from shared.errors import CheckpointError
from shared.families import get_family
from shared.keys import draw_key
from tests.shared.encoder_models import tiny_bert, tiny_paper

CONFIGS: dict[str, Callable[[], dict]] = {"bert": lambda: tiny_bert()[1], "paper": lambda: tiny_paper(causal=True)[1]}

WRONG_SHAPES = [  # (family, name, shape)
    ("bert", "encoder.layer.0.attention.self.query.weight", (32, 31)),
    ("bert", "encoder.layer.1.output.LayerNorm.bias", (33,)),
    ("bert", "encoder.layer.0.intermediate.dense.weight", (32, 32)),
    ("bert", "pooler.dense.weight", (32, 16)),
    ("bert", "embeddings.word_embeddings.weight", (60, 32)),
    ("bert", "embeddings.LayerNorm.weight", (31,)),
    ("paper", "layers.0.self_attn.q_proj.weight", (32, 31)),
    ("paper", "layers.1.attn_norm.bias", (31,)),
    ("paper", "layers.0.fc1.weight", (32, 32)),
    ("paper", "lm_head.weight", (52, 32)),
    ("paper", "lm_head.bias", (32,)),
    ("paper", "embed_tokens.weight", (53, 31)),
    ("paper", "embed_positions.weight", (23, 32)),
]
UNKNOWN_NAMES = [  # (family, name)
    ("bert", "encoder.layer.0.attention.self.rotary.weight"),
    ("bert", "encoder.layer.2.output.dense.bias"),  # beyond num_hidden_layers
    ("bert", "classifier.weight"),
    ("bert", "decoder.layer.0.output.dense.bias"),
    ("bert", "bert.bert.pooler.dense.bias"),
    ("paper", "layers.0.self_attn.rotary.weight"),
    ("paper", "layers.2.fc1.bias"),  # beyond num_hidden_layers
    ("paper", "model.layers.0.fc1.bias"),
    ("paper", "head.weight"),
]


def refuses(family_name: str, name: str, tensor: torch.Tensor, match: str) -> None:
    family, config = get_family(family_name), CONFIGS[family_name]()
    key = draw_key(family.dims(config))
    with pytest.raises(CheckpointError, match=match):
        family.transform(name, tensor, key, config)


@pytest.mark.parametrize(("family", "name", "shape"), WRONG_SHAPES)
def test_wrong_shape(family: str, name: str, shape: tuple[int, ...]) -> None:
    refuses(family, name, torch.zeros(shape), "shape")


@pytest.mark.parametrize(("family", "name"), UNKNOWN_NAMES)
def test_unknown_name(family: str, name: str) -> None:
    refuses(family, name, torch.zeros(32), "unexpected")
