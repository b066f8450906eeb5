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
from shared.keys import DeveloperKey, LayerKey, ModelDims
from shared.model_config import ModelConfig

Side = Literal["cloud", "user"]
Config = dict[str, Any]  # the model's config.json
Embedding = dict[str, torch.Tensor]  # the user's embedding module, by canonical name


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
    has_cache: bool = False  # whether `cloud_forward` keeps a KV cache

    @abstractmethod
    def dims(self, config: Config) -> ModelDims:
        """The sizes the key material depends on."""

    @abstractmethod
    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        """Map one original tensor to its transformed cloud tensor and/or user-side tensor.

        Raises CheckpointError for an unknown name or a tensor of the wrong shape.
        """

    def layer_pieces(
        self,
        name: str,
        tensor: torch.Tensor,
        key: DeveloperKey,
        match: tuple[int, str] | None,
        table: dict[str, str],
        prefix: str,
        *,
        conv1d: bool = False,
    ) -> list[Piece]:
        """A transformer block's tensor for the cloud, as `{prefix}.{i}.{rest}`.

        `match` is (i, rest), the block index and the name inside the block (None: `name` is
        no block's); `table` maps names inside a block to their role (see LAYER_ROLES).
        """
        if match is None or match[0] >= key.dims.n_layers or match[1] not in table:
            raise CheckpointError(f"unexpected tensor {name!r} for the {self.name} family")
        i, rest = match
        t = transform_layer_tensor(table[rest], name, tensor, key.layers[i], key.dims, key.pi, conv1d=conv1d)
        return [Piece("cloud", f"{prefix}.{i}.{rest}", t)]

    def extra_cloud_tensors(self, key: DeveloperKey, config: Config) -> Iterator[Piece]:
        """Cloud tensors that have no counterpart in the checkpoint (e.g. GPT-2's zero position table)."""
        return iter(())

    def cloud_config(self, config: Config) -> Config:
        """The config.json the cloud receives (e.g. with the head untied)."""
        return dict(config)

    def module_state(self, state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
        """θ′ in the checkpoint's layout -> the stock module's `state_dict` layout, as the installed
        transformers converts a checkpoint in `from_pretrained` (fused experts, renamed modules).
        θ′ on disk keeps the checkpoint layout; P2's loader assigns this one."""
        return state

    @abstractmethod
    def embedding_names(self, config: Config) -> tuple[str, ...]:
        """Canonical names of the embedding module's tensors, as stored in the user bundle."""

    def is_embedding_parameter(self, name: str, config: Config) -> bool:
        """Whether `name`, a parameter of the model `build_cloud_model` builds, is the embedding
        module's (P2 keeps it an unloaded placeholder): one of `embedding_names`, under any prefix."""
        return any(name == e or name.endswith("." + e) for e in self.embedding_names(config))

    def embed(
        self,
        embedding: dict[str, torch.Tensor],
        config: Config,
        input_ids: torch.Tensor,
        *,
        position_offset: int = 0,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User side: token ids (B, S) -> x (B, S, d), not yet permuted.

        `position_offset`: how many tokens of the sequence were sent before (GPT-2 also takes a
        (B,) tensor of per-row offsets, see `GPT2Family.embed_tokens`); `token_type_ids` (B, S):
        BERT's segments.
        """
        return self.embed_tokens(embedding, config, input_ids, position_offset, token_type_ids)

    def embed_tokens(
        self, embedding: Embedding, config: Config, ids: torch.Tensor, offset: int, types: torch.Tensor | None
    ) -> torch.Tensor:
        """`embed` with its options positional: what each family implements (or `embed` itself)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither embed_tokens nor embed")

    @abstractmethod
    def build_cloud_model(self, config: Config) -> nn.Module:
        """The stock class for θ′, built from the cloud config (on the current default device)."""

    def cloud_forward(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        last_only: bool = False,
    ) -> CloudOutput:
        """Cloud side: permuted x (B, S, d) -> permuted output, with the stock model code.

        `last_only`: the caller reads the last position only (generation, top-k), so a family
        may compute and return just that, (B, 1, ·); the KV cache still covers every position.
        A family without a KV cache (`has_cache` False) takes `cache=None` only, returns None
        and reads the whole sequence on every call.
        """
        if cache is not None and not self.has_cache:
            raise ValueError(f"a {self.name} model keeps no KV cache: send the whole sequence")
        return self.stock_forward(model, inputs_embeds, attention_mask, cache, last_only)

    def stock_forward(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cache: Any, last_only: bool
    ) -> CloudOutput:
        """`cloud_forward` with its arguments positional: what each family implements (or
        `cloud_forward` itself)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither stock_forward nor cloud_forward")

    def block_dims(self, config: Config, *, d_out: int, rope: bool, d_ff: int | None = None) -> ModelDims:
        """ModelDims from the sizes every family's config.json gives (`ModelConfig`), `d_ff` in
        place of its `intermediate_size`."""
        cfg = ModelConfig.from_json(config)
        d, n_heads, n_kv = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads
        if cfg.head_dim is None and d % n_heads:
            raise CheckpointError(f"hidden_size={d} is not a multiple of num_attention_heads={n_heads}")
        if n_heads % n_kv:
            raise CheckpointError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        head_dim = d // n_heads if cfg.head_dim is None else cfg.head_dim
        ffn = d_ff if d_ff is not None else cfg.intermediate_size
        if ffn is None:
            raise CheckpointError("config.json lacks intermediate_size")
        # ModelDims' fields in order: family, d_model, d_out, n_layers, n_heads, n_kv_heads, head_dim, d_ff
        layers = cfg.num_hidden_layers
        return ModelDims(self.name, d, d_out, layers, n_heads, n_kv, head_dim, ffn, rope=rope, encoder=self.is_encoder)


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


def head_weight(name: str, tensor: torch.Tensor, key: DeveloperKey) -> torch.Tensor:
    """An output head [d_out, d] (nn.Linear layout) for the cloud: W_c′ = πᵀ W_c π_c."""
    expect_shape(name, tensor, (key.dims.d_out, key.dims.d_model))
    return cols(rows(tensor, key.pi_c), key.pi)


def layer_match(pattern: str, name: str) -> tuple[int, str] | None:
    """Match `<prefix>.<i>.<rest>` where pattern is a regex for the prefix; return (i, rest)."""
    m = re.fullmatch(rf"(?:.*\.)?{pattern}\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else None


# --- the transformers config P2 builds the stock class from -----------------------------------

# Keys a config class accepts without declaring them: the legacy RoPE and dtype keys it converts
# (into `rope_parameters`, `dtype`), and those the stock modeling code reads with getattr(config, ...)
UNDECLARED_CONFIG_KEYS = frozenset(
    {"rope_theta", "rope_scaling", "partial_rotary_factor", "torch_dtype", "head_dim", "sliding_window", "num_labels"}
)
# Keys that choose code rather than describe the network: remote classes, hub kernels, quantisers
_CODE_KEY = re.compile(r"auto_map|trust_remote_code|quantization_config|custom_pipelines|.*_implementation.*|_.*")


def stock_config(config: Config) -> Any:
    """The stock transformers config of `config["model_type"]`, from an allowlist of its keys.

    Only the keys the config class itself declares (its fields and aliases) and
    UNDECLARED_CONFIG_KEYS reach transformers, and never one that selects code: an
    `attn_implementation` naming a hub kernel, an `auto_map` of remote classes, a
    `quantization_config` are dropped (the stock class then uses its default attention), so a
    config.json (a push, on P2) can describe a network but never choose the code that runs it.
    """
    import transformers

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"config.json's model_type {model_type!r} is not a stock transformers model type")
    cls = transformers.CONFIG_MAPPING[model_type]
    allowed = (set(cls().to_dict()) | set(cls.attribute_map) | UNDECLARED_CONFIG_KEYS) - {"model_type"}
    kept = {k: v for k, v in config.items() if k in allowed and not _CODE_KEY.fullmatch(k)}
    return cls(**kept)


def config_get(config: Config, *names: str, default: Any = None) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    if default is not None:
        return default
    raise CheckpointError(f"config.json lacks {' / '.join(names)}")


# --- the per-layer maths, once for every family ----------------------------------------------
#
# Each family names the tensors of a layer by their *role*; the transform of a role is the
# same in every family. Layout is nn.Linear's ([out, in], y = x Wᵀ); GPT-2's Conv1D stores the
# transpose and passes conv1d=True.
#   reads the permuted stream  (Q, K, V, FFN in): rows by the inner layout, columns by π
#   writes the permuted stream (O, FFN out):      rows by π, columns by the inner layout
#   norms and biases of the stream:               by π

LAYER_ROLES = (
    "q.weight", "k.weight", "v.weight", "qkv.weight", "q.bias", "k.bias", "v.bias", "qkv.bias",
    "o.weight", "o.bias", "ffn_in.weight", "ffn_in.bias", "ffn_out.weight", "ffn_out.bias", "norm",
)  # fmt: skip


# Attention named as transformers' Llama-style modules name it (our paper module borrows the names).
PROJ_ATTENTION = {
    "self_attn.q_proj.weight": "q.weight",
    "self_attn.k_proj.weight": "k.weight",
    "self_attn.v_proj.weight": "v.weight",
    "self_attn.q_proj.bias": "q.bias",
    "self_attn.k_proj.bias": "k.bias",
    "self_attn.v_proj.bias": "v.bias",
    "self_attn.o_proj.weight": "o.weight",
    "self_attn.o_proj.bias": "o.bias",
}


def _role_spec(
    role: str, lk: LayerKey, dims: ModelDims, pi: torch.Tensor
) -> tuple[tuple[int, ...], torch.Tensor | None, torch.Tensor | None]:
    """(expected [out, in] shape, row index, column index) of a layer tensor with this role."""
    d, hd = dims.d_model, dims.head_dim
    q_out, kv_out = dims.n_heads * hd, dims.n_kv_heads * hd
    if role.startswith("qkv."):  # fused Q | K | V outputs, each in the transformed layout
        idx = torch.cat([lk.q_rows(dims), q_out + lk.k_rows(dims), q_out + kv_out + lk.v_rows(dims)])
        out = q_out + 2 * kv_out
    else:
        out, idx = {
            "q": (q_out, lk.q_rows(dims)),
            "k": (kv_out, lk.k_rows(dims)),
            "v": (kv_out, lk.v_rows(dims)),
            "ffn_in": (dims.d_ff, lk.ffn),
            "o": (d, pi),
            "ffn_out": (d, pi),
            "norm": (d, pi),
        }[role.split(".")[0]]
    if not role.endswith(".weight"):
        return (out,), idx, None
    inner = {"o": (q_out, lk.o_cols(dims)), "ffn_out": (dims.d_ff, lk.ffn)}.get(role.split(".")[0])
    return ((d, inner[0]), pi, inner[1]) if inner else ((out, d), idx, pi)


def transform_layer_tensor(
    role: str, name: str, tensor: torch.Tensor, lk: LayerKey, dims: ModelDims, pi: torch.Tensor, *, conv1d: bool = False
) -> torch.Tensor:
    """Transform one layer tensor by its role; checks its shape, naming it on a mismatch."""
    shape, row_idx, col_idx = _role_spec(role, lk, dims, pi)
    t = tensor.T if conv1d and tensor.dim() == 2 else tensor
    if tuple(t.shape) != shape:
        expected = shape[::-1] if conv1d and len(shape) == 2 else shape
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
    if row_idx is not None:
        t = t.index_select(0, row_idx)
    if col_idx is not None:
        t = t.index_select(1, col_idx)
    return (t.T if conv1d and t.dim() == 2 else t).contiguous()


HEAD = "lm_head.weight"  # the stock causal-LM classes' output head


class CausalLMFamily(Family):
    """A decoder served by a stock `AutoModelForCausalLM` class with a KV cache.

    The cloud's head is always its own tensor, πᵀ W_c π_c: a tied head is untied, since the
    cloud holds no embedding table to tie it to.
    """

    has_cache = True

    def cloud_config(self, config: Config) -> Config:
        return dict(config, tie_word_embeddings=False)

    def token_table_pieces(
        self, name: str, tensor: torch.Tensor, key: DeveloperKey, *, user_name: str, tied: bool
    ) -> list[Piece]:
        """The token embedding table: to the user as is; with a tied head, also the cloud's head."""
        expect_shape(name, tensor, (key.dims.d_out, key.dims.d_model))
        pieces = [Piece("user", user_name, tensor)]
        if tied:
            pieces.append(Piece("cloud", HEAD, head_weight(name, tensor, key)))
        return pieces

    def token_mode_tensors(
        self, embedding: dict[str, torch.Tensor], key: DeveloperKey, config: Config
    ) -> dict[str, torch.Tensor]:
        """Token mode (PROTOCOL.md section 7): the embedding module for P2, under the cloud names.

        The token table becomes E′ = E[π_c][:, π]: row j is the embedding of token π_c[j], its
        columns permuted by π, so θ′ is a complete stock causal LM over ids relabelled by π_c.
        Families with learned positions add their position table permuted by π (GPT-2).
        """
        (name,) = self.embedding_names(config)  # RoPE families: the token table only
        return {name: cols(rows(embedding[name], key.pi_c), key.pi)}

    def head_pieces(self, name: str, tensor: torch.Tensor, key: DeveloperKey, *, tied: bool) -> list[Piece]:
        if tied:
            return []  # a stored copy of the tied table: the cloud's head comes from the token table
        return [Piece("cloud", HEAD, head_weight(name, tensor, key))]

    def build_cloud_model(self, config: Config) -> nn.Module:
        import transformers

        cfg = stock_config(self.cloud_config(config))
        return transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)

    def position_ids(self, attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
        """Positions P2 passes to the stock class (None: its default, past length + arange)."""
        return None

    def stock_forward(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cache: Any, last_only: bool
    ) -> CloudOutput:
        # x (B, S, d) permuted by π; mask (B, past + S) as in HF
        out = model(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=self.position_ids(mask, x.shape[1]),
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,  # the head on one position, not (S, V) per row
        )
        return CloudOutput(output=out.logits, cache=out.cache)  # (B, S or 1, V) permuted by π_c
