"""The BERT encoder family: `BertModel` (model_type "bert").

Post-LN blocks, GELU, learned absolute positions and token types, an embedding LayerNorm,
a bidirectional attention mask and a pooler. No rotary embeddings, so Q and K also get a
within-head permutation.

Who holds what:
- P3 (user) holds the embedding module (word, position and token-type tables and the
  embedding LayerNorm) under the canonical names `embeddings.*`, and π. It computes
  `x = LayerNorm(word + position + token_type)` and sends `x·π`.
- P2 (cloud) holds θ′: every encoder layer and the pooler, under the stock `BertModel`
  names (`encoder.layer.{i}.…`, `pooler.dense.…`), and feeds `x·π` straight into the
  stock `model.encoder`. Its `model.embeddings` is never loaded nor used.
- The output is the residual stream, so π_c = π (ModelDims.encoder): the hidden states
  (B, S, d) and the pooled output (B, d) come back permuted by π; P3 applies πᵀ.

Checkpoint names are accepted with or without the `bert.` prefix (task models such as
`BertForMaskedLM` store the encoder under it). The buffers `embeddings.position_ids` and
`embeddings.token_type_ids` are dropped, and so are the pretraining heads `cls.*`, which
the stock `BertModel` ignores too; any other name is a CheckpointError.
"""

import re
from typing import Any

import torch
import transformers
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from shared.errors import BadTensor, UnsupportedModel
from shared.families.base import (
    CloudOutput,
    Config,
    Embedding,
    Family,
    Piece,
    cols,
    config_get,
    expect_shape,
    rows,
    stock_config,
)
from shared.keys import DeveloperKey, ModelDims

WORD = "embeddings.word_embeddings.weight"
POSITION = "embeddings.position_embeddings.weight"
TOKEN_TYPE = "embeddings.token_type_embeddings.weight"
EMB_NORM_W = "embeddings.LayerNorm.weight"
EMB_NORM_B = "embeddings.LayerNorm.bias"
EMBEDDING_NAMES = (WORD, POSITION, TOKEN_TYPE, EMB_NORM_W, EMB_NORM_B)

_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# layer tensor names (after `encoder.layer.{i}.`) -> their role in shared.families.base
LAYER_TENSORS = {
    "attention.self.query.weight": "q.weight",
    "attention.self.key.weight": "k.weight",
    "attention.self.value.weight": "v.weight",
    "attention.self.query.bias": "q.bias",
    "attention.self.key.bias": "k.bias",
    "attention.self.value.bias": "v.bias",
    "attention.output.dense.weight": "o.weight",
    "attention.output.dense.bias": "o.bias",
    "attention.output.LayerNorm.weight": "norm",
    "attention.output.LayerNorm.bias": "norm",
    "intermediate.dense.weight": "ffn_in.weight",
    "intermediate.dense.bias": "ffn_in.bias",
    "output.dense.weight": "ffn_out.weight",
    "output.dense.bias": "ffn_out.bias",
    "output.LayerNorm.weight": "norm",
    "output.LayerNorm.bias": "norm",
}


class BertFamily(Family):
    name = "bert"
    architectures = ("BertModel",)
    model_types = ("bert",)
    is_encoder = True

    def dims(self, config: Config) -> ModelDims:
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise UnsupportedModel("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UnsupportedModel(f"BERT position_embedding_type {position_type!r} is not supported")
        # the output is the residual stream: π_c = π
        return self.block_dims(config, d_out=config_get(config, "hidden_size"), rope=False)

    def embedding_names(self, config: Config) -> tuple[str, ...]:
        return EMBEDDING_NAMES

    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        dims = key.dims
        d, pi = dims.d_model, key.pi
        local = name.removeprefix("bert.")
        if local in _BUFFERS or local.startswith("cls."):
            return []  # buffers the stock class recomputes; pretraining heads BertModel ignores
        embedding_shapes = {
            WORD: (config_get(config, "vocab_size"), d),
            POSITION: (config_get(config, "max_position_embeddings"), d),
            TOKEN_TYPE: (config_get(config, "type_vocab_size", default=2), d),
            EMB_NORM_W: (d,),
            EMB_NORM_B: (d,),
        }
        if local in embedding_shapes:  # the embedding module: user side only, never to P2
            expect_shape(name, tensor, embedding_shapes[local])
            return [Piece("user", local, tensor)]
        if local == "pooler.dense.weight":  # reads the permuted stream, writes a π-permuted output
            expect_shape(name, tensor, (d, d))
            return [Piece("cloud", local, cols(rows(tensor, pi), pi))]
        if local == "pooler.dense.bias":
            expect_shape(name, tensor, (d,))
            return [Piece("cloud", local, rows(tensor, pi))]
        m = _LAYER.fullmatch(local)
        match = (int(m.group(1)), m.group(2)) if m else None
        return self.layer_pieces(name, tensor, key, match, LAYER_TENSORS, "encoder.layer")

    def embed_tokens(
        self, embedding: Embedding, config: Config, ids: torch.Tensor, offset: int, types: torch.Tensor | None
    ) -> torch.Tensor:
        """User side, exactly `BertEmbeddings` in eval mode: LN(word + token_type + position)."""
        seq = ids.shape[1]
        n_positions = embedding[POSITION].shape[0]
        if offset < 0 or offset + seq > n_positions:
            raise BadTensor(f"positions {offset}..{offset + seq - 1} exceed the model's {n_positions} positions")
        types = torch.zeros_like(ids) if types is None else types
        positions = torch.arange(offset, offset + seq, device=ids.device)
        x = nn.functional.embedding(ids, embedding[WORD])  # (B, S, d)
        x = x + nn.functional.embedding(types, embedding[TOKEN_TYPE])
        x = x + nn.functional.embedding(positions, embedding[POSITION])[None]
        d = x.shape[-1]
        eps = float(config.get("layer_norm_eps", 1e-12))
        return nn.functional.layer_norm(x, (d,), embedding[EMB_NORM_W], embedding[EMB_NORM_B], eps)

    def build_cloud_model(self, config: Config) -> nn.Module:
        """The stock `BertModel`, in eval mode (no dropout). With a pooler unless the config
        says `"add_pooling_layer": false`; its `embeddings` submodule stays unloaded and unused."""
        cfg = stock_config(self.cloud_config(config))
        pooler = bool(config.get("add_pooling_layer", True))
        return transformers.BertModel(cfg, add_pooling_layer=pooler).eval()

    def stock_forward(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cache: Any, last_only: bool
    ) -> CloudOutput:
        """x·π (B, S, d) -> hidden states (B, S, d) and pooled (B, d), both permuted by π.

        Feeds the stock encoder stack directly, with the mask built as `BertModel.forward`
        builds it (`create_bidirectional_mask` for the configured attention implementation).
        An encoder has no KV cache: `cache` is None and None is returned.
        """
        if not isinstance(model, transformers.BertModel):
            raise TypeError(f"expected a BertModel, got {type(model).__name__}")
        full_mask = create_bidirectional_mask(config=model.config, inputs_embeds=x, attention_mask=mask)
        hidden = model.encoder(x, attention_mask=full_mask).last_hidden_state  # (B, S, d) by π
        # the pooler reads the first position, so `last_only` cannot shorten the encoder's work
        pooled = model.pooler(hidden) if model.pooler is not None else None  # (B, d) by π
        return CloudOutput(output=hidden[:, -1:] if last_only else hidden, cache=None, pooled=pooled)
