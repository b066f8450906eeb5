"""In-memory transform of a whole state dict: the pure `state_dict -> state_dict` entry point.

The streaming checkpoint writer (shared.checkpoint) applies the same per-tensor family
transform shard by shard; this module is the small-model and test path.
"""

from collections.abc import Mapping

import torch

from shared.errors import CheckpointError
from shared.families import Config, Family
from shared.keys import DeveloperKey


def transform_state_dict(
    family: Family, state_dict: Mapping[str, torch.Tensor], key: DeveloperKey, config: Config
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ -> (θ′ for the cloud, the embedding module for the user)."""
    cloud: dict[str, torch.Tensor] = {}
    user: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        for piece in family.transform(name, tensor, key, config):
            target = cloud if piece.side == "cloud" else user
            if piece.name in target:
                raise CheckpointError(f"two tensors map to {piece.name!r}")
            target[piece.name] = piece.tensor
    for piece in family.extra_cloud_tensors(key, config):
        cloud[piece.name] = piece.tensor
    missing = [n for n in family.embedding_names(config) if n not in user]
    if missing:
        raise CheckpointError(f"checkpoint lacks the embedding tensors {missing}")
    return cloud, user
