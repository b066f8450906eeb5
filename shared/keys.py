"""Key material of one deployment.

P1 (developer) holds the whole `DeveloperKey`; P3 (user) holds only the `UserKey` (π, π_c);
P2 (cloud) holds none of it. Keys are drawn from the OS CSPRNG and stored as safetensors with
a metadata header (format version, family, dims, key version, creation time, fingerprint).
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from shared.errors import KeyFormatError
from shared.files import write_atomic
from shared.permutation import is_permutation, random_permutation

KEY_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ModelDims:
    """The sizes the key material depends on, derived from a model's config by its family."""

    family: str
    d_model: int  # residual stream width: size of π
    d_out: int  # output width: size of π_c (vocabulary for LM heads, d_model for encoders)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope: bool  # with rotary embeddings only whole heads move
    # Encoders return the residual stream itself (d_out == d_model), so the output
    # permutation is π: draw_key sets π_c = π. Defaulted so older key files still load.
    encoder: bool = False
    # Mixture-of-experts layers (0: none): experts per layer, each expert's hidden width, and
    # the width of an always-on shared expert (Qwen2-MoE; 0: none).
    n_experts: int = 0
    d_expert: int = 0
    d_shared: int = 0

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "ModelDims":
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LayerKey:
    """Inner permutations of one layer; they never leave P1.

    With grouped-query attention, query head j of the transformed layer is original head
    `head[j]`, and it belongs to transformed KV head j // group, which is original KV head
    `kv_head[j // group]`, so every query head stays with its KV head.
    """

    kv_head: torch.Tensor  # (n_kv_heads,)
    head: torch.Tensor  # (n_heads,) consistent with kv_head, see above
    qk: torch.Tensor | None  # (n_kv_heads, head_dim) within-head Q/K dims, per transformed KV head; None with RoPE
    v: torch.Tensor  # (n_kv_heads, head_dim) within-head V dims, per transformed KV head
    ffn: torch.Tensor  # (d_ff,) feed-forward hidden units (SwiGLU gate and up share it)
    # Mixture of experts (None without): transformed expert j is original expert `experts[j]`
    # (router rows and expert order together); each expert's hidden units, per ORIGINAL expert
    # (gate and up share them, mirrored in down); the shared expert's hidden units.
    experts: torch.Tensor | None = None  # (n_experts,)
    expert_ffn: torch.Tensor | None = None  # (n_experts, d_expert), row e for original expert e
    shared_ffn: torch.Tensor | None = None  # (d_shared,)

    def q_rows(self, dims: ModelDims) -> torch.Tensor:
        """Row index of the transformed Q projection ((n_heads*head_dim,) into the original rows)."""
        hd, g = dims.head_dim, dims.group_size
        within = self._within(self.qk, dims).repeat_interleave(g, dim=0)  # (n_heads, hd)
        return (self.head[:, None] * hd + within).reshape(-1)

    def k_rows(self, dims: ModelDims) -> torch.Tensor:
        return (self.kv_head[:, None] * dims.head_dim + self._within(self.qk, dims)).reshape(-1)

    def v_rows(self, dims: ModelDims) -> torch.Tensor:
        return (self.kv_head[:, None] * dims.head_dim + self.v).reshape(-1)

    def o_cols(self, dims: ModelDims) -> torch.Tensor:
        """Column index of the transformed output projection: query heads carry their KV head's V layout."""
        within = self.v.repeat_interleave(dims.group_size, dim=0)  # (n_heads, hd)
        return (self.head[:, None] * dims.head_dim + within).reshape(-1)

    @staticmethod
    def _within(p: torch.Tensor | None, dims: ModelDims) -> torch.Tensor:
        if p is None:
            return torch.arange(dims.head_dim).expand(dims.n_kv_heads, -1)
        return p


LAYER_TENSORS = ("kv_head", "head", "qk", "v", "ffn", "experts", "expert_ffn", "shared_ffn")  # in key files


def _draw_layer(dims: ModelDims) -> LayerKey:
    g = dims.group_size
    kv_head = random_permutation(dims.n_kv_heads)
    head = torch.cat([kv_head[c] * g + random_permutation(g) for c in range(dims.n_kv_heads)])
    qk = None
    if not dims.rope:
        qk = torch.stack([random_permutation(dims.head_dim) for _ in range(dims.n_kv_heads)])
    v = torch.stack([random_permutation(dims.head_dim) for _ in range(dims.n_kv_heads)])
    moe: dict[str, torch.Tensor] = {}
    if dims.n_experts:
        moe["experts"] = random_permutation(dims.n_experts)
        moe["expert_ffn"] = torch.stack([random_permutation(dims.d_expert) for _ in range(dims.n_experts)])
    if dims.d_shared:
        moe["shared_ffn"] = random_permutation(dims.d_shared)
    return LayerKey(kv_head=kv_head, head=head, qk=qk, v=v, ffn=random_permutation(dims.d_ff), **moe)


@dataclass(frozen=True)
class UserKey:
    """What an authorised user holds: π over d_model and π_c over the output dimension."""

    pi: torch.Tensor  # (d_model,)
    pi_c: torch.Tensor  # (d_out,)
    family: str
    key_version: int
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the user part: version, π and π_c."""
        h = hashlib.sha256()
        h.update(f"stip-user-key/{KEY_FORMAT_VERSION}/{self.key_version}/".encode())
        h.update(self.pi.numpy().tobytes())
        h.update(self.pi_c.numpy().tobytes())
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        return {
            "format_version": KEY_FORMAT_VERSION,
            "family": self.family,
            "d_model": str(self.pi.numel()),
            "d_out": str(self.pi_c.numel()),
            "key_version": str(self.key_version),
            "created_at": str(self.created_at),
            "fingerprint": self.fingerprint,
        }

    def save(self, path: str | Path) -> None:
        _save_private({"pi": self.pi, "pi_c": self.pi_c}, self.metadata(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "UserKey":
        tensors, meta = _load(Path(path))
        key = cls._from_parts(tensors, meta)
        if meta.get("fingerprint") != key.fingerprint:
            raise KeyFormatError(f"{path}: fingerprint does not match its permutations")
        return key

    @classmethod
    def _from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "UserKey":
        try:
            pi, pi_c = tensors["pi"], tensors["pi_c"]
            key = cls(
                pi=pi,
                pi_c=pi_c,
                family=meta["family"],
                key_version=int(meta["key_version"]),
                created_at=int(meta["created_at"]),
            )
        except (KeyError, ValueError) as e:
            raise KeyFormatError(f"key file lacks or garbles {e}") from None
        if not (is_permutation(pi) and is_permutation(pi_c)):
            raise KeyFormatError("pi and pi_c must be int64 permutations")
        return key


@dataclass(frozen=True)
class DeveloperKey:
    """Everything P1 holds for one key version: the user key plus every inner permutation."""

    user: UserKey
    dims: ModelDims
    layers: tuple[LayerKey, ...]

    @property
    def pi(self) -> torch.Tensor:
        return self.user.pi

    @property
    def pi_c(self) -> torch.Tensor:
        return self.user.pi_c

    def save(self, path: str | Path) -> None:
        tensors = {"pi": self.pi, "pi_c": self.pi_c}
        for i, layer in enumerate(self.layers):
            for name in LAYER_TENSORS:
                t = getattr(layer, name)
                if t is not None:
                    tensors[f"layers.{i}.{name}"] = t
        meta = self.user.metadata() | {"dims": json.dumps(self.dims.to_json())}
        _save_private(tensors, meta, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "DeveloperKey":
        tensors, meta = _load(Path(path))
        user = UserKey._from_parts(tensors, meta)
        try:
            dims = ModelDims.from_json(json.loads(meta["dims"]))
            layers = tuple(
                LayerKey(
                    kv_head=tensors[f"layers.{i}.kv_head"],
                    head=tensors[f"layers.{i}.head"],
                    qk=tensors.get(f"layers.{i}.qk"),
                    v=tensors[f"layers.{i}.v"],
                    ffn=tensors[f"layers.{i}.ffn"],
                    experts=tensors.get(f"layers.{i}.experts"),
                    expert_ffn=tensors.get(f"layers.{i}.expert_ffn"),
                    shared_ffn=tensors.get(f"layers.{i}.shared_ffn"),
                )
                for i in range(dims.n_layers)
            )
        except (KeyError, ValueError, TypeError) as e:
            raise KeyFormatError(f"{path}: developer key lacks or garbles {e}") from None
        if meta.get("fingerprint") != user.fingerprint:
            raise KeyFormatError(f"{path}: fingerprint does not match its permutations")
        for i, lk in enumerate(layers):
            experts_missing = bool(dims.n_experts) and (lk.experts is None or lk.expert_ffn is None)
            if experts_missing or (bool(dims.d_shared) and lk.shared_ffn is None):
                raise KeyFormatError(f"{path}: layer {i} lacks its expert permutations")
        return cls(user=user, dims=dims, layers=layers)


def draw_key(dims: ModelDims, *, key_version: int = 1) -> DeveloperKey:
    """Draw a fresh key set for a model of these dims from the OS CSPRNG.

    For an encoder (`dims.encoder`) the output is the permuted residual stream, so π_c is a
    copy of π (a copy, not a view: safetensors refuses to save tensors that share memory).
    """
    pi = random_permutation(dims.d_model)
    if dims.encoder:
        if dims.d_out != dims.d_model:
            raise ValueError(f"an encoder has d_out == d_model, got {dims.d_out} != {dims.d_model}")
        pi_c = pi.clone()
    else:
        pi_c = random_permutation(dims.d_out)
    user = UserKey(
        pi=pi,
        pi_c=pi_c,
        family=dims.family,
        key_version=key_version,
    )
    return DeveloperKey(user=user, dims=dims, layers=tuple(_draw_layer(dims) for _ in range(dims.n_layers)))


def _save_private(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Write key material with owner-only permissions, atomically (tmp file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise KeyFormatError(f"cannot read key file {path}: {e}") from None
    if meta.get("format_version") != KEY_FORMAT_VERSION:
        raise KeyFormatError(f"{path}: unknown key format version {meta.get('format_version')!r}")
    return tensors, meta
