"""The paper's original Transformer (Yuan, Zhang, Li, "Secure Transformer Inference", eqs. (1)-(5)).

A small module of our own, served through the same `Family` interface as the stock classes.
For input x (B, S, d), each post-LN block computes

    (1) Q = x W_q + b_q,  K = x W_k + b_k,  V = x W_v + b_v        (per head: d -> head_dim)
    (2) Attn(x) = softmax(Q Kᵀ / sqrt(head_dim) + M) V W_o + b_o   (heads concatenated)
    (3) x = LN(x + Attn(x))                                        (LN with weight γ and bias β)
    (4) FFN(x) = ReLU(x W_1 + b_1) W_2 + b_2
    (5) x = LN(x + FFN(x))

with M the padding mask (encoder block) or the padding and causal mask (masked decoder
block), chosen by `PaperConfig.causal`. An output head Linear(d, vocab) with bias follows the
last block. The token embedding and the learned position embedding form the embedding module
and run on the user side (P3); the cloud model (P2) is built without them.

The transform moves every parameter, LayerNorm weights **and biases** included (by π): the
paper's reference code leaves the norms alone, which is only right while γ = 1 and β = 0.
The head becomes `W_c′ = πᵀ W_c π_c` (rows by π_c, columns by π) and its bias `b_c[π_c]`.

No KV cache: `cloud_forward` recomputes the whole sequence on every call and returns
`cache=None`, so a caller must send the full sequence (positions from 0) each time.

Its config.json form carries `"model_type": "stip_paper"` and
`"architectures": ["StipPaperTransformer"]`; checkpoint names follow `PaperTransformer`'s
own attributes (`layers.{i}.self_attn.q_proj.weight`, `embed_tokens.weight`, ...).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from shared.errors import BadTensor, CheckpointError
from shared.families.base import (
    PROJ_ATTENTION,
    CloudOutput,
    Config,
    Embedding,
    Family,
    Piece,
    expect_shape,
    head_weight,
    layer_match,
    rows,
)
from shared.keys import DeveloperKey, ModelDims

EMBED = "embed_tokens.weight"
POSITIONS = "embed_positions.weight"
# layer tensor names (after `layers.{i}.`) -> their role in shared.families.base
LAYER_TENSORS = {
    **PROJ_ATTENTION,
    "attn_norm.weight": "norm",
    "attn_norm.bias": "norm",
    "fc1.weight": "ffn_in.weight",
    "fc1.bias": "ffn_in.bias",
    "fc2.weight": "ffn_out.weight",
    "fc2.bias": "ffn_out.bias",
    "ffn_norm.weight": "norm",
    "ffn_norm.bias": "norm",
}


@dataclass(frozen=True)
class PaperConfig:
    """Sizes of the paper's Transformer; field names are the config.json keys."""

    MODEL_TYPE: ClassVar[str] = "stip_paper"
    ARCHITECTURE: ClassVar[str] = "StipPaperTransformer"

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    max_position_embeddings: int
    causal: bool = True  # masked (decoder) blocks; False: bidirectional (encoder) blocks
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type is int}
        bad = [n for n, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
        if bad:
            raise CheckpointError(f"stip_paper config: {', '.join(bad)} must be positive integers")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_json(self) -> Config:
        return {
            "model_type": self.MODEL_TYPE,
            "architectures": [self.ARCHITECTURE],
            **dataclasses.asdict(self),
        }

    @classmethod
    def from_json(cls, config: Config) -> "PaperConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        try:
            return cls(**{n: config[n] for n in names if n in config})
        except TypeError as e:  # a required size is missing
            raise CheckpointError(f"stip_paper config.json: {e}") from None


def paper_embed(
    embed_tokens: torch.Tensor,
    embed_positions: torch.Tensor,
    input_ids: torch.Tensor,
    position_offset: int = 0,
) -> torch.Tensor:
    """Token ids (B, S) -> x (B, S, d): token embedding plus learned position embedding."""
    seq = input_ids.shape[1]
    n_positions = embed_positions.shape[0]
    if position_offset < 0 or position_offset + seq > n_positions:
        raise BadTensor(
            f"positions {position_offset}..{position_offset + seq - 1} exceed the model's {n_positions} positions"
        )
    positions = torch.arange(position_offset, position_offset + seq, device=input_ids.device)
    return nn.functional.embedding(input_ids, embed_tokens) + nn.functional.embedding(positions, embed_positions)[None]


def attention_mask_4d(
    attention_mask: torch.Tensor | None, batch: int, seq: int, causal: bool, device: torch.device
) -> torch.Tensor:
    """(B, S) padding mask (1 = token, 0 = padding) -> bool (B, 1, S, S), True: may attend."""
    allowed = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=device)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    return allowed


class PaperAttention(nn.Module):
    """Equations (1)-(2): multi-head attention with biases on Q, K, V and O."""

    def __init__(self, config: PaperConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        heads = (b, s, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # (B, h, S, hd)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, h, S, S)
        # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        z = scores.softmax(dim=-1) @ v  # (B, h, S, hd)
        return self.o_proj(z.transpose(1, 2).reshape(b, s, d))


class PaperBlock(nn.Module):
    """Equations (3)-(5): post-LN residual attention then post-LN residual ReLU FFN."""

    def __init__(self, config: PaperConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = PaperAttention(config)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.self_attn(x, allowed))
        return self.ffn_norm(x + self.fc2(nn.functional.relu(self.fc1(x))))


class PaperTransformer(nn.Module):
    """The whole network. `with_embedding=False` builds the cloud's copy, which has no
    embedding module and takes `inputs_embeds` (permuted by π) only."""

    def __init__(self, config: PaperConfig, *, with_embedding: bool = True) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens: nn.Embedding | None = None
        self.embed_positions: nn.Embedding | None = None
        if with_embedding:
            self.embed_tokens = nn.Embedding(config.vocab_size, d)
            self.embed_positions = nn.Embedding(config.max_position_embeddings, d)
        self.layers = nn.ModuleList(PaperBlock(config) for _ in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(d, config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids or embeddings (B, S, d) -> logits (B, S, vocab)."""
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            if self.embed_tokens is None or self.embed_positions is None:
                raise ValueError("this copy has no embedding module; pass inputs_embeds")
            inputs_embeds = paper_embed(self.embed_tokens.weight, self.embed_positions.weight, input_ids)
        b, s, _ = inputs_embeds.shape
        allowed = attention_mask_4d(attention_mask, b, s, self.config.causal, inputs_embeds.device)
        x = inputs_embeds
        for block in self.layers:
            x = block(x, allowed)
        return self.lm_head(x)


class PaperFamily(Family):
    name = "paper"
    architectures = (PaperConfig.ARCHITECTURE,)
    model_types = (PaperConfig.MODEL_TYPE,)
    is_encoder = False  # both variants end in the vocabulary head: P2 returns logits permuted by π_c

    def dims(self, config: Config) -> ModelDims:
        cfg = PaperConfig.from_json(config)  # checked: positive sizes, whole heads
        return self.block_dims(dataclasses.asdict(cfg), d_out=cfg.vocab_size, rope=False)

    def embedding_names(self, config: Config) -> tuple[str, ...]:
        return (EMBED, POSITIONS)

    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        dims = key.dims
        d, pi_c = dims.d_model, key.pi_c
        if name == EMBED:
            expect_shape(name, tensor, (dims.d_out, d))
            return [Piece("user", EMBED, tensor)]
        if name == POSITIONS:
            expect_shape(name, tensor, (PaperConfig.from_json(config).max_position_embeddings, d))
            return [Piece("user", POSITIONS, tensor)]
        if name == "lm_head.weight":
            return [Piece("cloud", name, head_weight(name, tensor, key))]
        if name == "lm_head.bias":
            expect_shape(name, tensor, (dims.d_out,))
            return [Piece("cloud", name, rows(tensor, pi_c))]
        m = layer_match("layers", name) if name.startswith("layers.") else None
        return self.layer_pieces(name, tensor, key, m, LAYER_TENSORS, "layers")

    def embed_tokens(
        self, embedding: Embedding, config: Config, ids: torch.Tensor, offset: int, types: torch.Tensor | None
    ) -> torch.Tensor:
        return paper_embed(embedding[EMBED], embedding[POSITIONS], ids, offset)

    def build_cloud_model(self, config: Config) -> nn.Module:
        return PaperTransformer(PaperConfig.from_json(config), with_embedding=False).eval()

    def stock_forward(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cache: Any, last_only: bool
    ) -> CloudOutput:
        """x·π (B, S, d) -> logits (B, S, vocab) permuted by π_c. No KV cache: `cache` is None,
        None is returned, and every call carries the whole sequence."""
        logits = model(inputs_embeds=x, attention_mask=mask)
        return CloudOutput(output=logits[:, -1:] if last_only else logits, cache=None)
