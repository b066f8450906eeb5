"""In-memory transform of a whole state dict: the pure `state_dict -> state_dict` entry point.

The streaming checkpoint writer (shared.checkpoint) applies the same per-tensor family
transform shard by shard; this module is the small-model and test path.
"""

from collections.abc import Mapping

import torch

from shared.errors import CheckpointError, UnsupportedModel
from shared.families import Config, Family
from shared.families.base import CausalLMFamily
from shared.keys import DeveloperKey

MODES = ("embeds", "token")


def token_tables(
    family: Family, mode: str, embedding: Mapping[str, torch.Tensor], key: DeveloperKey, config: Config
) -> dict[str, torch.Tensor]:
    """The cloud tensors that token mode adds to θ′ (E′ = E[π_c][:, π], ...); none in embeds mode.

    They replace the family's extra cloud tensors of the same name (GPT-2's zero position table).
    """
    if not check_mode(family, mode) or not isinstance(family, CausalLMFamily):
        return {}  # (check_mode has refused token mode for every other family)
    return family.token_mode_tensors(dict(embedding), key, config)


def check_mode(family: Family, mode: str) -> bool:
    """True for token mode, False for embeds mode; raises for a mode the family cannot serve."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "token" and not isinstance(family, CausalLMFamily):
        raise UnsupportedModel(
            f"token mode needs a decoder (a causal LM); the {family.name} family is not one: use mode=embeds"
        )
    return mode == "token"


def transform_state_dict(
    family: Family,
    state_dict: Mapping[str, torch.Tensor],
    key: DeveloperKey,
    config: Config,
    *,
    mode: str = "embeds",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ -> (θ′ for the cloud, the embedding module for the user); `mode="token"` adds E′ to θ′."""
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
    cloud.update(token_tables(family, mode, user, key, config))
    return cloud, user
