"""The fields of a model's config.json that the protocol reads, as one typed, frozen object.

`ModelConfig.from_json(config)` reads them once, under their transformers names or the other
names the config classes accept for them (GPT-2's `n_embd`, `n_head`, `n_layer`,
`n_positions`), and checks their types. Keys only one family reads (BERT's `type_vocab_size`,
ViT's `image_size`, ...) stay in the config dict that family gets.
"""

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from shared.errors import CheckpointError

# other names a config.json may give a field (GPT2Config's attribute_map), tried after its own
ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("n_embd",),
    "num_attention_heads": ("n_head",),
    "num_hidden_layers": ("n_layer",),
    "max_position_embeddings": ("n_positions",),
}


@dataclass(frozen=True)
class ModelConfig:
    """A transformer's sizes as config.json gives them; None where it leaves one out."""

    hidden_size: int  # d: the residual stream's width
    num_attention_heads: int
    num_hidden_layers: int
    num_key_value_heads: int | None = None  # None: as many as attention heads (no GQA)
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    intermediate_size: int | None = None  # the FFN width (GPT-2: n_inner, its own default)
    vocab_size: int | None = None  # None: no token table (ViT)
    max_position_embeddings: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @classmethod
    def from_json(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """The fields from a config.json dict. CheckpointError names a required one it lacks;
        TypeError one that is not an integer (a bool is not one), ValueError one below 1."""
        values: dict[str, Any] = {}
        for field, hint in get_type_hints(cls).items():
            names = (field, *ALIASES.get(field, ()))
            value = next((config[n] for n in names if config.get(n) is not None), None)
            optional = get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)
            if value is None and not optional:
                raise CheckpointError(f"config.json lacks {' / '.join(names)}")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"config.json: {' / '.join(names)} must be an integer, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"config.json: {' / '.join(names)} must be positive, got {value}")
            values[field] = value
        return cls(**values)
