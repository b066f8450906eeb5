"""The tiny Llama of the vllm engine's tests (tests/e2e's models come from stip_demo.models)."""

from typing import Any

from tests.support import TINY_LLAMA

# vLLM's CPU attention takes head sizes 32, 64, 80, ...: the tiny Llama with head_dim 32 (GQA 4:2)
CONFIG: dict[str, Any] = dict(
    TINY_LLAMA, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2
)
