"""What every family's test of "each permutation changes P2's weights" shares (test_gpt2,
test_llama, test_moe, test_vit, test_bert, test_paper): a key with one permutation replaced by
the identity, and the cloud tensors that the change moves, against the ones it must move; and
the refusal of a checkpoint with an unknown name or without its embedding."""

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

from shared.errors import CheckpointError
from shared.families import Family
from shared.keys import DeveloperKey, LayerKey
from shared.transform import transform_state_dict
from tests.support import nonidentity_key

State = dict[str, torch.Tensor]


def with_identity(key: DeveloperKey, *parts: str, layer: int | None = None) -> DeveloperKey:
    """The same key with the named permutations replaced by the identity: the user's `pi` or
    `pi_c`, or in layer `layer` (every layer by default) `head` (KV heads too), `kv_head` (no KV
    head moves, queries keep their order within each group), `group` (KV heads still move, the
    queries within a group stay in place), or any other LayerKey field (`qk`, `v`, `ffn`,
    `experts`, `expert_ffn`, `shared_ffn`)."""
    g, n_kv = key.dims.group_size, key.dims.n_kv_heads
    user = {p: torch.arange(getattr(key.user, p).numel()) for p in parts if p in ("pi", "pi_c")}

    def change(lk: LayerKey) -> LayerKey:
        for part in parts:
            if part == "head":
                lk = replace(lk, head=torch.arange(lk.head.numel()), kv_head=torch.arange(lk.kv_head.numel()))
            elif part == "kv_head":
                within = lk.head - lk.kv_head.repeat_interleave(g) * g
                lk = replace(lk, kv_head=torch.arange(n_kv), head=torch.arange(n_kv).repeat_interleave(g) * g + within)
            elif part == "group":
                lk = replace(lk, head=lk.kv_head.repeat_interleave(g) * g + torch.arange(g).repeat(n_kv))
            elif part not in user:
                old = getattr(lk, part)
                lk = replace(lk, **{part: torch.arange(old.shape[-1]).expand_as(old).contiguous()})
        return lk

    layers = tuple(change(lk) if layer in (None, i) else lk for i, lk in enumerate(key.layers))
    return replace(key, user=replace(key.user, **user), layers=layers)


def moved(family: Family, state: State, config: dict, cloud: State, other: DeveloperKey) -> set[str]:
    """The names of `cloud`'s tensors (θ′ under some key) that differ in θ′ under the key `other`."""
    alt, _ = transform_state_dict(family, state, other, config)
    assert alt.keys() == cloud.keys()
    return {n for n in cloud if not torch.equal(cloud[n], alt[n])}


@dataclass(frozen=True)
class Moves:
    """Which of a family's cloud tensors each permutation must change, by checkpoint name."""

    inner: tuple[str, ...]  # the name endings π leaves alone: biases of inner units (no d axis)
    head: frozenset[str]  # what π_c changes
    depth: int  # a layer tensor's name within its layer is `name.split(".", depth)[-1]`
    layer: dict[str, set[str]]  # an inner permutation: the layer tensors it changes

    def __call__(self, part: str, cloud: State, key: DeveloperKey) -> set[str]:
        if part == "pi":  # every tensor that reads or writes the residual stream
            return {n for n in cloud if not n.endswith(self.inner)}
        if part == "pi_c":
            return set(self.head)
        return {n for n in cloud if n.split(".", self.depth)[-1] in self.layer[part]}


def assert_each_permutation_moves(
    family: Family, state: State, config: dict, part: str, expected: Callable[[str, State, DeveloperKey], set[str]]
) -> None:
    """Would fail if the family skipped a permutation, or applied it where it does not belong:
    with a key where every permutation moves something, replacing `part` by the identity changes
    exactly the cloud tensors `expected(part, cloud, key)` names."""
    key = nonidentity_key(family.dims(config))
    cloud, _ = transform_state_dict(family, state, key, config)
    want = expected(part, cloud, key)
    assert want  # the test checks something
    assert moved(family, state, config, cloud, with_identity(key, part)) == want


def assert_refused_by_name(
    family: Family,
    state: State,
    key: DeveloperKey,
    config: dict,
    *,
    unexpected: tuple[str, ...],
    embedding: str,
    shape: tuple[int, ...] = (32,),
) -> None:
    """A checkpoint with a name the family does not know (each of `unexpected`, as a zero tensor
    of `shape`), or without its embedding tensor (every name holding `embedding` left out), is
    refused, naming what is wrong."""
    for name in unexpected:
        with pytest.raises(CheckpointError, match="unexpected"):
            family.transform(name, torch.zeros(shape), key, config)
    no_embedding = {n: t for n, t in state.items() if embedding not in n}
    with pytest.raises(CheckpointError, match="embedding"):
        transform_state_dict(family, no_embedding, key, config)


def assert_layer_moves(
    family: Family,
    state: State,
    config: dict,
    key: DeveloperKey,
    parts: tuple[str, ...],
    expected: Callable[[int, str], set[str]],
) -> tuple[State, State]:
    """Layer by layer, replacing one inner permutation of `key` by the identity changes exactly
    the cloud tensors `expected(layer, part)`, and every cloud tensor differs from the original.
    Returns the transform under `key`: (θ′, the user's embedding module)."""
    cloud, user = transform_state_dict(family, state, key, config)
    for i in range(len(key.layers)):
        for part in parts:
            assert moved(family, state, config, cloud, with_identity(key, part, layer=i)) == expected(i, part), part
    for name, t in cloud.items():
        assert not torch.equal(t, state[name]), name
    return cloud, user
