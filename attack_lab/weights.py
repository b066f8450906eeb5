"""Attack 5: weight matching. P2 holds θ′ and knows a reference with the same values in another
order: the public base model (laid out by the public transform code with identity permutations,
`scenario.identity_key`), or another θ′ of the same model (an earlier key version, another
group's deployment). Permutations move values, they do not change them:

- π: each residual coordinate j of θ′ has a fingerprint that no permutation of the other axes
  changes (norm weights and biases at j, the sorted column j of every matrix reading the
  stream, the sorted row j of every matrix writing it); fingerprints are matched to the
  reference's by the Hungarian algorithm.
- inner permutations (heads and within-head dims through the Q/K/V row layouts, feed-forward
  units): with π known, the rows of each θ′ matrix equal reference rows; matched the same way.
- π_c: the rows of the output head, columns un-permuted by π, against the reference head.

Robust to small changes (a fine-tuned derivative of the base): nearest fingerprints, not
exact equality.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from attack_lab.embedding import nearest_rows
from attack_lab.scenario import Deployment, StateDict, identity_key
from shared.families import bert, llama
from shared.transform import transform_state_dict

# per family: the regex of a block's tensors, their roles (shared.families.*), and the roles of
# the tensors outside the blocks
_ROLES = {
    "llama": (re.compile(r"model\.layers\.(\d+)\.(.+)"), llama.LAYER_TENSORS, {"model.norm.weight": "norm"}),
    "bert": (re.compile(r"encoder\.layer\.(\d+)\.(.+)"), bert.LAYER_TENSORS, {"pooler.dense.bias": "norm"}),
}
_READS = ("q.weight", "k.weight", "v.weight", "ffn_in.weight")  # rows inner, columns π
_WRITES = ("o.weight", "ffn_out.weight")  # rows π, columns inner
_VECTORS = ("norm", "o.bias", "ffn_out.bias")  # by π
_INNER = {"q": "q", "k": "k", "v": "v", "ffn_in": "ffn"}  # role prefix -> inner layout


@dataclass(frozen=True)
class Recovered:
    pi: torch.Tensor  # θ′ coordinate j is reference coordinate pi[j]
    pi_c: torch.Tensor | None  # head row j is reference head row pi_c[j] (None: no head)
    inner: dict[tuple[int, str], torch.Tensor]  # (layer, "q"|"k"|"v"|"ffn") -> row layout
    seconds: float


def reference_from_base(dep: Deployment) -> StateDict:
    """The public base model in θ′'s names and layout, un-permuted (P2 runs the public transform code)."""
    ident = identity_key(dep.family.dims(dep.config))
    return transform_state_dict(dep.family, dep.public, ident, dep.config)[0]


def _fingerprints(sd: StateDict, family: str) -> torch.Tensor:
    """(d, f): a per-coordinate fingerprint of the residual stream that no inner permutation changes."""
    parts = []
    for name in sorted(sd):
        layer, role = tensor_role(family, name)
        t = sd[name].float()
        if role in _VECTORS:
            parts.append(t[:, None])
        elif role in _READS:
            parts.append(torch.sort(t, dim=0).values.T)  # sorted column j
        elif role in _WRITES:
            parts.append(torch.sort(t, dim=1).values)  # sorted row j
    return torch.cat(parts, dim=1)


def _assign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One-to-one: row i of `a` matched to row result[i] of `b` (Hungarian on L2 distances)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(a.double(), b.double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    out = torch.empty(len(a), dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return out


def match_weights(cloud: StateDict, reference: StateDict, family: str) -> Recovered:
    """Recover π, the inner row layouts and π_c of θ′ (`cloud`) relative to `reference`."""
    if family not in _ROLES:
        raise ValueError(f"weight matching knows the llama and bert families, not {family!r}")
    t0 = time.perf_counter()
    pi = _assign(_fingerprints(cloud, family), _fingerprints(reference, family))
    inner: dict[tuple[int, str], torch.Tensor] = {}
    groups: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name in sorted(cloud):
        layer, role = tensor_role(family, name)
        if layer is None or role is None or role.split(".")[0] not in _INNER:
            continue
        kind = _INNER[role.split(".")[0]]
        mine, theirs = groups.setdefault((layer, kind), ([], []))
        t, r = cloud[name].float(), reference[name].float()
        if t.dim() == 2:  # columns by π: bring the reference's columns into θ′'s order
            t, r = t, r[:, pi]
        else:
            t, r = t[:, None], r[:, None]
        mine.append(t)
        theirs.append(r)
    for group, (mine, theirs) in groups.items():
        inner[group] = _assign(torch.cat(mine, 1), torch.cat(theirs, 1))
    pi_c = None
    if "lm_head.weight" in cloud:
        pi_c = nearest_rows(cloud["lm_head.weight"], reference["lm_head.weight"][:, pi])
    return Recovered(pi, pi_c, inner, time.perf_counter() - t0)


def tensor_role(family: str, name: str) -> tuple[int | None, str | None]:
    """(block index or None, role in shared.families.base or None) of a θ′ tensor name."""
    layer_re, table, outside = _ROLES[family]
    m = layer_re.fullmatch(name)
    if m:
        return int(m.group(1)), table.get(m.group(2))
    return None, outside.get(name)


def true_inner(dep: Deployment) -> dict[tuple[int, str], torch.Tensor]:
    """The deployment's real inner row layouts, for scoring."""
    dims = dep.key.dims
    out = {}
    for i, lk in enumerate(dep.key.layers):
        out[(i, "q")], out[(i, "k")], out[(i, "v")] = lk.q_rows(dims), lk.k_rows(dims), lk.v_rows(dims)
        out[(i, "ffn")] = lk.ffn
    return out


@dataclass(frozen=True)
class WeightScore:
    pi: float
    pi_c: float | None
    inner: float  # fraction of all inner row indices recovered
    seconds: float


def score(found: Recovered, pi: torch.Tensor, pi_c: torch.Tensor | None, inner: dict) -> WeightScore:
    """Fractions of indices equal to the truth (the same layout relative to the reference)."""
    hits = sum(int((found.inner[g] == inner[g]).sum()) for g in inner)
    total = sum(inner[g].numel() for g in inner)
    pc = None if found.pi_c is None or pi_c is None else float((found.pi_c == pi_c).float().mean())
    return WeightScore(float((found.pi == pi).float().mean()), pc, hits / total, found.seconds)
