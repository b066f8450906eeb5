"""End to end with the MoE and ViT families: P2 and P1 as real processes on loopback (the
containers' commands), every byte P2 receives recorded by a proxy, P3 through the SDK.

Greedy generation on small random Mixtral and Qwen2-MoE models equals `generate()` token for
token; a random ViT classifier's class scores on random images equal the stock model's on the
image processor's own pixels, and P2 received neither the pixels nor the patch embedding.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from stip_demo.models import copy_tokenizer
from tests.e2e.reference import stock_generate
from tests.e2e.stack import ProxiedStack as Stack
from tests.e2e.stack import proxied_stack
from tests.support import TOL, assert_close, randomize_parameters

NEW_TOKENS = 24
PROMPT_IDS = [101, 2023, 2003, 1037, 3231, 1997, 2797, 28937, 1012]
LABELS = ["heron", "egret", "stork", "crane", "ibis", "bittern"]
DECODER = dict(
    vocab_size=30522,  # MiniLM's WordPiece tokenizer
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    bos_token_id=101,
    eos_token_id=102,
    pad_token_id=0,
)


def _models(root: Path) -> dict[str, Path]:
    mixtral = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**DECODER, intermediate_size=64, num_local_experts=4)
    )
    qwen = transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **DECODER, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4
        )
    )
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            image_size=32,
            patch_size=8,
            id2label=dict(enumerate(LABELS)),
            label2id={n: i for i, n in enumerate(LABELS)},
        )
    )
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    paths = {}
    for name, model, seed in (("mixtral", mixtral, 1), ("qwen2_moe", qwen, 2), ("vit", vit, 3)):
        path = root / name
        randomize_parameters(model, scale=0.2, seed=seed, norm_spread=0.3)
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(path)
        if name == "vit":
            ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
        else:
            copy_tokenizer(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("e2e-families")
    with proxied_stack(work) as s:
        for name, path in _models(work / "models").items():
            model, _ = s.deploy(name, path)
            assert model.family == name
        yield s


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_greedy_generation_equals_generate(stack: Stack, name: str) -> None:
    with stack.client(name) as client:
        private = client.generate_ids(PROMPT_IDS, max_new_tokens=NEW_TOKENS, temperature=0.0, eos=False)
    assert private == stock_generate(stack.model_dirs[name], PROMPT_IDS, NEW_TOKENS)
    assert len(set(private)) > 3  # a real continuation, not one token repeated


def test_vit_class_scores_equal_the_stock_model(stack: Stack, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 36, 3), dtype=np.uint8)).save(paths[-1])
    before = len(stack.proxy.received)
    with stack.client("vit") as client:
        logits = client.image_logits([str(p) for p in paths])
        top = client.classify([str(p) for p in paths], top_k=2)
    path = stack.model_dirs["vit"]
    model = transformers.ViTForImageClassification.from_pretrained(path).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pixels).logits
    assert_close(ref, logits)
    probs = ref.softmax(-1)
    for row, p in zip(top, probs, strict=True):
        assert [c.label for c in row] == [LABELS[i] for i in p.argsort(descending=True)[:2].tolist()]
        assert abs(row[0].score - float(p.max())) <= TOL  # a softmax of logits that meet within the fp32 bound
    # what P2 received for these requests: x·π, never the pixels (float32 bytes of the pixel values)
    received = stack.proxy.received[before:]
    assert received and pixels[0, 0, 0, :8].numpy().tobytes() not in received
