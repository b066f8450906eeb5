"""The Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

RMSNorm, SwiGLU, rotary embeddings (so only whole heads move, no within-head Q/K
permutation), grouped-query attention, optional Q/K/V biases (Qwen2) and tied or untied head.
Names follow the stock checkpoints: `model.layers.{i}.self_attn.q_proj.weight`, ...
"""

import torch
from torch import nn

from shared.families.base import (
    HEAD,
    PROJ_ATTENTION,
    CausalLMFamily,
    Config,
    Embedding,
    Piece,
    config_get,
    expect_shape,
    layer_match,
    rows,
)
from shared.keys import DeveloperKey, ModelDims

EMBED = "model.embed_tokens.weight"
# layer tensor names (after `model.layers.{i}.`) -> their role in shared.families.base
LAYER_TENSORS = {
    **PROJ_ATTENTION,
    "mlp.gate_proj.weight": "ffn_in.weight",  # SwiGLU: gate and up share the hidden permutation
    "mlp.up_proj.weight": "ffn_in.weight",
    "mlp.gate_proj.bias": "ffn_in.bias",
    "mlp.up_proj.bias": "ffn_in.bias",
    "mlp.down_proj.weight": "ffn_out.weight",
    "mlp.down_proj.bias": "ffn_out.bias",
    "input_layernorm.weight": "norm",
    "post_attention_layernorm.weight": "norm",
}


class LlamaFamily(CausalLMFamily):
    name = "llama"
    architectures: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    model_types: tuple[str, ...] = ("llama", "mistral", "qwen2")

    def dims(self, config: Config) -> ModelDims:
        return self.block_dims(config, d_out=config_get(config, "vocab_size"), rope=True)

    def embedding_names(self, config: Config) -> tuple[str, ...]:
        return (EMBED,)

    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        tied = bool(config.get("tie_word_embeddings", False))
        if name.endswith("rotary_emb.inv_freq"):
            return []  # a buffer the stock class recomputes
        if name.endswith("embed_tokens.weight"):
            return self.token_table_pieces(name, tensor, key, user_name=EMBED, tied=tied)
        if name == HEAD:
            return self.head_pieces(name, tensor, key, tied=tied)
        m = layer_match("layers", name)
        if name.endswith("norm.weight") and m is None:
            expect_shape(name, tensor, (key.dims.d_model,))
            return [Piece("cloud", "model.norm.weight", rows(tensor, key.pi))]
        return self.layer_pieces(name, tensor, key, m, LAYER_TENSORS, "model.layers")

    def embed_tokens(
        self, embedding: Embedding, config: Config, ids: torch.Tensor, offset: int, types: torch.Tensor | None
    ) -> torch.Tensor:
        # RoPE positions are applied by P2 from its cache length; nothing positional here.
        return nn.functional.embedding(ids, embedding[EMBED])

    def position_ids(self, attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        # As generate() does for padded batches: RoPE positions count the real tokens only.
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
