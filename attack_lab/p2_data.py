"""Weight matching on a real P2's data directory: what an operator of `stip-cloud` can do with
the files it keeps (`DATA/deployments/{id}/active.json` and the active θ′ it names).

There is no key to score against here, so the check is self-evident instead: under the
permutations recovered from θ′ and the public base alone, θ′ must equal the base's weights
exactly (max |Δ| reported); a wrong π or π_c could not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from attack_lab import weights
from attack_lab.scenario import StateDict, identity_key
from shared.api import PUSH_CONFIG, PUSH_FAMILY
from shared.families import Family, get_family
from shared.transform import transform_state_dict


@dataclass(frozen=True)
class DataDirResult:
    deployment_id: str
    key_version: int
    family: str
    max_delta: float  # θ′ against the base under the recovered permutations
    seconds: float


def read_deployments(data_dir: Path) -> list[tuple[str, int, Family, dict, StateDict]]:
    """Every active deployment of a P2 data directory: (id, key version, family, cloud config, θ′)."""
    out = []
    for active in sorted((Path(data_dir) / "deployments").glob("*/active.json")):
        record = json.loads(active.read_text())
        path = active.parent / record["file"]
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        out.append(
            (
                str(record["deployment_id"]),
                int(record["key_version"]),
                get_family(meta[PUSH_FAMILY]),
                json.loads(meta[PUSH_CONFIG]),
                load_file(str(path)),
            )
        )
    return out


def audit_data_dir(data_dir: Path, base_dir: Path) -> list[DataDirResult]:
    """Match each active θ′ of `data_dir` whose shapes fit the public base model in `base_dir`."""
    base_config = json.loads((Path(base_dir) / "config.json").read_text())
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    results = []
    for dep_id, version, family, config, cloud in read_deployments(data_dir):
        if family.name not in ("llama", "bert") or family.dims(config) != family.dims(base_config):
            continue
        ref = transform_state_dict(family, base, identity_key(family.dims(config)), base_config)[0]
        found = weights.match_weights(cloud, ref, family.name)
        results.append(
            DataDirResult(dep_id, version, family.name, _max_delta(cloud, ref, found, family.name), found.seconds)
        )
    return results


def _max_delta(cloud: StateDict, ref: StateDict, found: weights.Recovered, family: str) -> float:
    """θ′ against the reference re-permuted by what was recovered: 0.0 means recovered exactly."""
    worst = 0.0
    for name, t in cloud.items():
        r = ref.get(name)
        if r is None or r.shape != t.shape:
            continue
        _, role = weights.tensor_role(family, name)
        if role in ("norm", "o.bias", "ffn_out.bias"):
            r = r[found.pi]
        elif name == "lm_head.weight" and found.pi_c is not None:
            r = r[found.pi_c][:, found.pi]
        else:
            continue
        worst = max(worst, float((t.float() - r.float()).abs().max()))
    return worst
