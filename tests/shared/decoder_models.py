"""The tests' small stock decoders, one table: every decoder family's classes, base config and
variants (test_decoders runs the checks every family shares over all of them; test_gpt2,
test_llama and test_moe add what only their family has).

A variant is a base config with a few fields overridden; every parameter of its model is random
(`randomize_parameters`, norms included), with a std that keeps the logits of order 1.
"""

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from shared.families import Family, get_family
from shared.families.gpt2 import WTE
from shared.families.llama import EMBED
from shared.keys import DeveloperKey
from tests.support import TINY_LLAMA, Deployment, deploy_decoder, randomize_parameters


@dataclass(frozen=True)
class Decoder:
    """A stock decoder class and the config the tests start it from."""

    family: Family
    config_cls: type[transformers.PretrainedConfig]
    model_cls: type[nn.Module]
    args: dict[str, Any]  # the base config; a variant overrides a few fields
    embed: str  # the token table's name: the one tensor P2 must not hold
    scale: float = 0.2  # randomize_parameters' std

    @property
    def vocab(self) -> int:
        return int(self.args["vocab_size"])

    def config(self, **overrides: object) -> transformers.PretrainedConfig:
        return self.config_cls(**{**self.args, **overrides})

    def model(self, config: transformers.PretrainedConfig | None = None, seed: int = 0) -> nn.Module:
        """The stock model for `config` (the base config by default), every parameter random."""
        torch.manual_seed(seed)
        config = self.config() if config is None else config
        return randomize_parameters(self.model_cls(config), scale=self.scale, seed=seed)

    def deploy(self, model: nn.Module, key: DeveloperKey | None = None) -> Deployment:
        """tests.support.deploy_decoder with this class's token table."""
        return deploy_decoder(self.family, model, self.embed, key)


_IDS: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)  # no BOS/EOS, pad id 0
# TINY_LLAMA's sizes (GQA 4:2, two layers, untied), as the config classes' keyword arguments
_LLAMA_SIZES = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "tie_word_embeddings")
_LLAMA_LIKE = {n: TINY_LLAMA[n] for n in _LLAMA_SIZES} | _IDS | dict(max_position_embeddings=128)
_LLAMA = _LLAMA_LIKE | dict(vocab_size=101, intermediate_size=40)
_MOE = _LLAMA_LIKE | dict(vocab_size=97, intermediate_size=24, num_experts_per_tok=2)
_GPT2 = _IDS | dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
_QWEN2_MOE = dict(num_experts=4, moe_intermediate_size=12, shared_expert_intermediate_size=20, intermediate_size=40)

DECODERS: dict[str, Decoder] = {  # by model_type
    "gpt2": Decoder(get_family("gpt2"), transformers.GPT2Config, transformers.GPT2LMHeadModel, _GPT2, WTE, 0.3),
    "llama": Decoder(get_family("llama"), transformers.LlamaConfig, transformers.LlamaForCausalLM, _LLAMA, EMBED),
    "mistral": Decoder(get_family("llama"), transformers.MistralConfig, transformers.MistralForCausalLM, _LLAMA, EMBED),
    "qwen2": Decoder(get_family("llama"), transformers.Qwen2Config, transformers.Qwen2ForCausalLM, _LLAMA, EMBED),
    "mixtral": Decoder(
        get_family("mixtral"),
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        _MOE | {"num_local_experts": 4},
        EMBED,
    ),
    "qwen2_moe": Decoder(
        get_family("qwen2_moe"), transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, _MOE | _QWEN2_MOE, EMBED
    ),
}

VARIANTS: dict[str, tuple[str, dict[str, object]]] = {  # name: (model_type, overrides)
    "gpt2": ("gpt2", {}),
    "gpt2-n_inner": ("gpt2", {"n_inner": 24, "activation_function": "gelu"}),
    "gpt2-untied": ("gpt2", {"tie_word_embeddings": False}),
    "gpt2-scaled-upcast": ("gpt2", {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}),
    "gpt2-eager-1head": ("gpt2", {"n_head": 1, "attn_implementation": "eager"}),
    "llama-gqa2": ("llama", {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-headdim": ("llama", {"head_dim": 12, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"num_key_value_heads": 1, "head_dim": 6}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-headdim": ("qwen2", {"tie_word_embeddings": True, "head_dim": 16}),
    "mixtral-top2": ("mixtral", {}),
    "mixtral-top1-mqa-tied": (
        "mixtral",
        {"num_experts_per_tok": 1, "num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
    "mixtral-top3-of-5": ("mixtral", {"num_local_experts": 5, "num_experts_per_tok": 3, "head_dim": 12}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-normtopk-dense": (
        "qwen2_moe",
        {"norm_topk_prob": True, "num_hidden_layers": 3, "mlp_only_layers": [1], "tie_word_embeddings": True},
    ),
    "qwen2_moe-sparse-step": ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
}


def decoder_model(model_type: str, seed: int = 0, **overrides: object) -> tuple[Decoder, nn.Module]:
    """A model of `model_type` with `overrides` on its base config, and its table entry."""
    decoder = DECODERS[model_type]
    return decoder, decoder.model(decoder.config(**overrides), seed=seed)


def variant_model(name: str) -> tuple[Decoder, nn.Module]:
    model_type, overrides = VARIANTS[name]
    return decoder_model(model_type, **overrides)
