"""The plaintext reference of the end-to-end suites: the stock class on the original weights."""

from pathlib import Path
from typing import Any

import torch
import transformers


def stock_generate(model_dir: Path, prompt: list[int], n: int, **options: Any) -> list[int]:
    """The n ids the stock class's `generate()` adds to `prompt` (greedy unless `options` say
    otherwise); EOS neither stops nor is suppressed, as the SDK's `eos=False`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt])
    options = {"do_sample": False} | options
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, eos_token_id=None, pad_token_id=0, **options
        )
    return [int(t) for t in out[0, len(prompt) :]]
