"""Mixture-of-experts decoders: MixtralForCausalLM and Qwen2MoeForCausalLM.

Attention, norms, embedding and head are the Llama family's. Each sparse layer adds a router
and a list of SwiGLU experts (Qwen2-MoE also an always-on shared expert with a sigmoid gate).
Checkpoints hold one tensor per expert, which the installed transformers fuses when it loads
them (`experts.{e}.w1/w3` -> `experts.gate_up_proj` (E, 2 * d_expert, d), `experts.{e}.w2` ->
`experts.down_proj` (E, d, d_expert)); the transform works on the checkpoint's names and θ′
keeps that layout, so the stock class's `from_pretrained` loads it the same way, and
`module_state` does the same fusion for P2's loader.

Permutations of a sparse layer (P1 draws them with the key; P2 never sees them):
- π on everything that reads or writes the residual stream: router columns, every expert's
  gate/up columns and down rows, the shared expert likewise, `shared_expert_gate` columns;
- σ over the experts (`LayerKey.experts`): transformed expert j is original expert σ[j], and
  the router's row j is the original row σ[j], so softmax and top-k pick the same experts
  with the same weights (under new indices), token by token;
- per original expert e, a hidden-unit permutation (`LayerKey.expert_ffn[e]`): rows of its
  gate and up, columns of its down; the shared expert has its own (`LayerKey.shared_ffn`).
"""

import re
from dataclasses import replace

import torch

from shared.errors import CheckpointError
from shared.families.base import Config, Piece, cols, config_get, expect_shape, rows, transform_layer_tensor
from shared.families.llama import LlamaFamily
from shared.keys import DeveloperKey, ModelDims

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


class _MoEFamily(LlamaFamily):
    block: str  # the sparse block's name in the checkpoint (Mixtral: block_sparse_moe)
    expert_names: tuple[str, str, str]  # an expert's gate, up and down projections
    n_experts_key: str
    d_expert_key: str
    d_shared_key: str | None = None

    def dims(self, config: Config) -> ModelDims:
        dims = super().dims(config)
        n_experts = int(config_get(config, self.n_experts_key))
        top_k = int(config_get(config, "num_experts_per_tok"))
        if not 0 < top_k <= n_experts:
            raise CheckpointError(f"num_experts_per_tok={top_k} must lie in 1..{self.n_experts_key}={n_experts}")
        d_shared = int(config_get(config, self.d_shared_key)) if self.d_shared_key else 0
        return replace(
            dims, n_experts=n_experts, d_expert=int(config_get(config, self.d_expert_key)), d_shared=d_shared
        )

    def is_sparse(self, config: Config, layer: int) -> bool:
        """Whether layer `layer` is a mixture-of-experts block (else a dense Llama MLP)."""
        return True

    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        m = _LAYER.fullmatch(name)
        if m is None or int(m[1]) >= key.dims.n_layers or not self.is_sparse(config, int(m[1])):
            return super().transform(name, tensor, key, config)  # attention, norms, embedding, head, dense MLPs
        i, local = int(m[1]), m[2]
        if not local.startswith((f"{self.block}.", "mlp.")):
            return super().transform(name, tensor, key, config)
        if not local.startswith(f"{self.block}."):  # a dense MLP where the config says sparse
            raise CheckpointError(f"unexpected tensor {name!r} for the {self.name} family: layer {i} is sparse")
        prefix = f"model.layers.{i}.{self.block}."
        return [Piece("cloud", prefix + n, t) for n, t in self._sparse(name.removeprefix(prefix), name, tensor, key, i)]

    def _sparse(
        self, rest: str, name: str, tensor: torch.Tensor, key: DeveloperKey, i: int
    ) -> list[tuple[str, torch.Tensor]]:
        """A sparse block's tensor, `rest` named inside the block: [(cloud name inside it, θ′ tensor)]."""
        dims, lk, pi = key.dims, key.layers[i], key.pi
        if lk.experts is None or lk.expert_ffn is None:
            raise CheckpointError(
                f"the key has no expert permutations for layer {i}: draw it for the {self.name} family"
            )
        down = self.expert_names[2]
        if rest == "gate.weight":  # the router (E, d): rows by σ, columns by π
            expect_shape(name, tensor, (dims.n_experts, dims.d_model))
            return [(rest, cols(rows(tensor, lk.experts), pi))]
        em = re.fullmatch(r"experts\.(\d+)\.(\w+)\.weight", rest)
        if em and int(em[1]) < dims.n_experts and em[2] in self.expert_names:
            e = int(em[1])
            j = int(torch.nonzero(lk.experts == e)[0, 0])  # original expert e sits at position j
            role = "ffn_out.weight" if em[2] == down else "ffn_in.weight"
            ek, ed = replace(lk, ffn=lk.expert_ffn[e]), replace(dims, d_ff=dims.d_expert)
            return [(f"experts.{j}.{em[2]}.weight", transform_layer_tensor(role, name, tensor, ek, ed, pi))]
        if dims.d_shared and lk.shared_ffn is not None:
            if rest == "shared_expert_gate.weight":  # (1, d) reads the stream
                expect_shape(name, tensor, (1, dims.d_model))
                return [(rest, cols(tensor, pi))]
            sm = re.fullmatch(r"shared_expert\.(\w+)\.weight", rest)
            if sm and sm[1] in ("gate_proj", "up_proj", "down_proj"):
                role = "ffn_out.weight" if sm[1] == "down_proj" else "ffn_in.weight"
                sk, sd = replace(lk, ffn=lk.shared_ffn), replace(dims, d_ff=dims.d_shared)
                return [(rest, transform_layer_tensor(role, name, tensor, sk, sd, pi))]
        raise CheckpointError(f"unexpected tensor {name!r} for the {self.name} family")

    def module_state(self, state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
        """Checkpoint layout -> the stock module's, as transformers' conversion mapping does on load:
        the block renamed to `mlp`, per-expert tensors fused into `experts.gate_up_proj` (E, 2·d_e, d)
        (gate rows, then up rows) and `experts.down_proj` (E, d, d_e)."""
        dims = self.dims(config)
        gate, up, down = self.expert_names
        out: dict[str, torch.Tensor] = {}
        experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        for name, t in state.items():
            m = re.fullmatch(rf"model\.layers\.(\d+)\.{self.block}\.experts\.(\d+)\.(\w+)\.weight", name)
            if m and m[3] in self.expert_names:
                experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
            else:
                out[name.replace(f".{self.block}.", ".mlp.")] = t
        for i in sorted({i for i, _ in experts}):
            per = {p: experts.get((i, p), {}) for p in self.expert_names}
            lacking = [f"{p}[{e}]" for p, got in per.items() for e in range(dims.n_experts) if e not in got]
            if lacking or any(len(got) != dims.n_experts for got in per.values()):
                raise CheckpointError(f"layer {i}'s experts are incomplete: missing {lacking[:6]}")
            n = range(dims.n_experts)
            out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([per[gate][e], per[up][e]]) for e in n]
            )
            out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([per[down][e] for e in n])
        return out


class MixtralFamily(_MoEFamily):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    block = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")
    n_experts_key = "num_local_experts"
    d_expert_key = "intermediate_size"


class Qwen2MoeFamily(_MoEFamily):
    name = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    block = "mlp"
    expert_names = ("gate_proj", "up_proj", "down_proj")
    n_experts_key = "num_experts"
    d_expert_key = "moe_intermediate_size"
    d_shared_key = "shared_expert_intermediate_size"

    def is_sparse(self, config: Config, layer: int) -> bool:
        # as Qwen2MoeDecoderLayer decides
        step = int(config.get("decoder_sparse_step", 1))
        return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0
