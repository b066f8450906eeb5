"""The GPT-2 family: GPT2LMHeadModel.

What differs from Llama: `Conv1D` stores weights as [in, out] (y = x W + b), so a weight
that reads the permuted residual stream permutes its ROWS by π and one that writes to it
permutes its COLUMNS by π; Q, K and V are fused in `attn.c_attn` (columns Q | K | V, each
n_heads * head_dim); no rotary embeddings, so Q/K also get the within-head permutation;
LayerNorm weights and biases; learned absolute positions; head tied to `wte`.

Who holds what:
- P3 (user): the embedding module `transformer.wte.weight` and `transformer.wpe.weight`;
  `embed` adds the token and position embeddings before P3 permutes by π.
- P2 (cloud): every block, `ln_f`, an untied head `lm_head.weight = πᵀ W_wte π_c`, and an
  all-zero `transformer.wpe.weight`, so the stock class adds nothing positional. It never
  receives `wte`, except in token mode (PROTOCOL.md section 7): then P2 holds wte[π_c][:, π]
  and the real position table permuted by π, wpe[:, π], and adds positions itself.

Checkpoint names are accepted with or without the `transformer.` prefix (hub GPT-2
checkpoints use bare `h.0.attn.c_attn.weight`); the cloud names are the canonical
`transformer.`-prefixed ones of the stock class.
"""

import re
from collections.abc import Iterator

import torch
from torch import nn

from shared.errors import CheckpointError
from shared.families.base import (
    HEAD,
    CausalLMFamily,
    Config,
    Embedding,
    Piece,
    cols,
    config_get,
    expect_shape,
    rows,
)
from shared.keys import DeveloperKey, ModelDims
from shared.model_config import ModelConfig

PREFIX = "transformer."
WTE = "transformer.wte.weight"
WPE = "transformer.wpe.weight"
# Non-parameter buffers that old checkpoints carry (the causal mask); the stock class rebuilds them.
# layer tensor names (after `transformer.h.{i}.`) -> their role in shared.families.base
LAYER_TENSORS = {
    "ln_1.weight": "norm",
    "ln_1.bias": "norm",
    "attn.c_attn.weight": "qkv.weight",  # fused: output columns Q | K | V
    "attn.c_attn.bias": "qkv.bias",
    "attn.c_proj.weight": "o.weight",
    "attn.c_proj.bias": "o.bias",
    "ln_2.weight": "norm",
    "ln_2.bias": "norm",
    "mlp.c_fc.weight": "ffn_in.weight",
    "mlp.c_fc.bias": "ffn_in.bias",
    "mlp.c_proj.weight": "ffn_out.weight",
    "mlp.c_proj.bias": "ffn_out.bias",
}
BUFFERS = ("attn.bias", "attn.masked_bias", "crossattention.bias", "crossattention.masked_bias")


class GPT2Family(CausalLMFamily):
    name = "gpt2"
    architectures = ("GPT2LMHeadModel",)
    model_types = ("gpt2",)

    def dims(self, config: Config) -> ModelDims:
        d_ff = config_get(config, "n_inner", default=4 * ModelConfig.from_json(config).hidden_size)
        return self.block_dims(config, d_out=config_get(config, "vocab_size"), rope=False, d_ff=d_ff)

    def embedding_names(self, config: Config) -> tuple[str, ...]:
        return (WTE, WPE)

    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        d = key.dims.d_model
        tied = _tied(config)
        canon = name if name.startswith(PREFIX) or name == HEAD else PREFIX + name
        if canon == WTE:
            return self.token_table_pieces(name, tensor, key, user_name=WTE, tied=tied)
        if canon == WPE:
            expect_shape(name, tensor, (_n_positions(config), d))
            return [Piece("user", WPE, tensor)]  # the cloud's table is zero: extra_cloud_tensors
        if canon == HEAD:
            return self.head_pieces(name, tensor, key, tied=tied)
        if canon in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
            expect_shape(name, tensor, (d,))
            return [Piece("cloud", canon, rows(tensor, key.pi))]
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", canon)
        match = (int(m[1]), m[2]) if m else None
        if match and match[0] < key.dims.n_layers and match[1] in BUFFERS:
            return []
        # Conv1D stores [in, out], the transpose of nn.Linear's layout
        return self.layer_pieces(name, tensor, key, match, LAYER_TENSORS, "transformer.h", conv1d=True)

    def token_mode_tensors(
        self, embedding: dict[str, torch.Tensor], key: DeveloperKey, config: Config
    ) -> dict[str, torch.Tensor]:
        """Token mode: wte′ = wte[π_c][:, π] and the real position table wpe′ = wpe[:, π] (in
        place of the zero one), so the stock class adds positions on P2."""
        wte, wpe = embedding[WTE], embedding[WPE]
        return {WTE: cols(rows(wte, key.pi_c), key.pi), WPE: cols(wpe, key.pi)}

    def extra_cloud_tensors(self, key: DeveloperKey, config: Config) -> Iterator[Piece]:
        # Positions are added on the user side; the stock class adds this all-zero table.
        zeros = torch.zeros(_n_positions(config), key.dims.d_model, dtype=_dtype(config))
        yield Piece("cloud", WPE, zeros)

    def embed_tokens(
        self, embedding: Embedding, config: Config, ids: torch.Tensor, offset: int | torch.Tensor, types: object
    ) -> torch.Tensor:
        """User side: wte[ids] + wpe[offset + arange(S)], (B, S) -> (B, S, d), unpermuted.

        `offset` (`embed`'s `position_offset`) is the number of tokens of the sequence already sent (the session's
        length), the same for every row. For a left-padded batch, the positions of each row
        are the caller's concern, as in `generate()` (positions count the real tokens only):
        pass a (B,) tensor of per-row offsets, `past_length - n_pad[b]`; positions that come
        out negative (the padding itself, which the attention mask hides) are clamped to 0.
        """
        wte, wpe = embedding[WTE], embedding[WPE]
        seq = torch.arange(ids.shape[-1], device=ids.device)
        if isinstance(offset, torch.Tensor):
            per_row = offset.to(device=ids.device, dtype=torch.long).reshape(-1, 1)
            positions = (per_row + seq).clamp(min=0)  # (B, S)
        else:
            positions = (offset + seq).clamp(min=0).expand_as(ids)  # (B, S)
        if positions.numel() and int(positions.max()) >= wpe.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the model's {wpe.shape[0]} positions")
        return nn.functional.embedding(ids, wte) + nn.functional.embedding(positions, wpe)

    # cloud_forward: CausalLMFamily's; positions were added by P3 and P2's position table is zero


def _tied(config: Config) -> bool:
    # GPT2Config ties the head by default; hub config.json files often leave the key out.
    return bool(config.get("tie_word_embeddings", True))


def _n_positions(config: Config) -> int:
    n = ModelConfig.from_json(config).max_position_embeddings
    if n is None:
        raise CheckpointError("config.json lacks n_positions")
    return n


def _dtype(config: Config) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
