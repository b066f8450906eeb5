"""`stip-developer example-model`: the demo's small random decoders, written where a new user asks."""

from pathlib import Path

import pytest
import torch
import transformers

from developer_service.cli import main
from developer_service.service import inspect_model

STOCK = {
    "llama": transformers.LlamaForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    "qwen2": transformers.Qwen2ForCausalLM,
}


@pytest.mark.parametrize("family", STOCK)
def test_example_model_writes_a_random_decoder(family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / family
    assert main(["example-model", family, str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out.resolve()}\n"  # the directory, for scripts: MODEL=$(stip-developer ...)
    assert "RANDOM weights" in captured.err and "gibberish" in captured.err
    assert f"stip-developer register {out.resolve()}" in captured.err

    model = STOCK[family].from_pretrained(out)  # the stock class loads it
    norms = [p for n, p in model.named_parameters() if "norm" in n or "ln_" in n]
    assert norms and all(not torch.allclose(p, torch.ones_like(p)) for p in norms if p.dim() == 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("Once upon a time")["input_ids"]
    p1_family, architectures, *_ = inspect_model(out.resolve())  # P1 accepts it
    assert architectures == [STOCK[family].__name__]
    assert p1_family == ("gpt2" if family == "gpt2" else "llama")  # Qwen2 is of the Llama family

    # never over an existing directory
    assert main(["example-model", family, str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
