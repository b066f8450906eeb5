"""What every model family provides, and the small index helpers the transforms share.

A family turns one tensor of the original checkpoint into the tensors it becomes: for the
cloud (θ′, under the stock class's names) and for the user's embedding module (under the
original names). It is a pure function of (name, tensor, key, config): no file or HTTP I/O,
so the checkpoint writer can stream a model shard by shard.
"""

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from shared.errors import CheckpointError
from shared.keys import DeveloperKey, ModelDims

Side = Literal["cloud", "user"]
Config = dict[str, Any]  # the model's config.json


@dataclass(frozen=True)
class Piece:
    """One output tensor of the transform: where it goes and under which name."""

    side: Side
    name: str
    tensor: torch.Tensor


@dataclass
class CloudOutput:
    """What a cloud forward pass returns, still in the permuted space."""

    output: torch.Tensor  # (B, S, d_out) logits permuted by π_c, or (B, S, d) hidden states permuted by π
    cache: Any  # the stock class's KV cache (None for encoders)
    pooled: torch.Tensor | None = None  # encoders with a pooler: (B, d) permuted by π


class Family(ABC):
    """One supported model family (GPT-2, Llama, BERT, ...)."""

    name: str
    architectures: tuple[str, ...]  # config.json "architectures" entries this family serves
    model_types: tuple[str, ...]  # config.json "model_type" values this family serves
    is_encoder: bool = False

    @abstractmethod
    def dims(self, config: Config) -> ModelDims:
        """The sizes the key material depends on."""

    @abstractmethod
    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        """Map one original tensor to its transformed cloud tensor and/or user-side tensor.

        Raises CheckpointError for an unknown name or a tensor of the wrong shape.
        """

    def extra_cloud_tensors(self, key: DeveloperKey, config: Config) -> Iterator[Piece]:
        """Cloud tensors that have no counterpart in the checkpoint (e.g. GPT-2's zero position table)."""
        return iter(())

    def cloud_config(self, config: Config) -> Config:
        """The config.json the cloud receives (e.g. with the head untied)."""
        return dict(config)

    @abstractmethod
    def embedding_names(self, config: Config) -> tuple[str, ...]:
        """Canonical names of the embedding module's tensors, as stored in the user bundle."""

    @abstractmethod
    def embed(
        self,
        embedding: dict[str, torch.Tensor],
        config: Config,
        input_ids: torch.Tensor,
        *,
        position_offset: int = 0,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User side: token ids (B, S) -> x (B, S, d), not yet permuted."""

    @abstractmethod
    def build_cloud_model(self, config: Config) -> nn.Module:
        """The stock class for θ′, built from the cloud config (on the current default device)."""

    @abstractmethod
    def cloud_forward(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any = None,
    ) -> CloudOutput:
        """Cloud side: permuted x (B, S, d) -> permuted output, with the stock model code."""


# --- index helpers shared by the transforms ---------------------------------------------


def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Reorder the rows (dim 0) of a weight or a bias."""
    return t.index_select(0, idx).contiguous()


def cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Reorder the columns (dim 1) of a weight."""
    return t.index_select(1, idx).contiguous()


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")


def layer_match(pattern: str, name: str) -> tuple[int, str] | None:
    """Match `<prefix>.<i>.<rest>` where pattern is a regex for the prefix; return (i, rest)."""
    m = re.fullmatch(rf"(?:.*\.)?{pattern}\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else None


def config_get(config: Config, *names: str, default: Any = None) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    if default is not None:
        return default
    raise CheckpointError(f"config.json lacks {' / '.join(names)}")
