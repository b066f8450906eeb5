"""Real weights: all-MiniLM-L6-v2 through STIP equals sentence-transformers' own encode()."""

import json
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

from shared.families import detect_family
from shared.families.bert import EMBEDDING_NAMES, BertFamily
from shared.keys import draw_key
from shared.permutation import permute, unpermute
from shared.pooling import mean_pool, normalize
from shared.transform import transform_state_dict
from stip_demo.models import minilm_path
from tests.sentences import SENTENCES
from tests.support import max_abs_diff

MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return minilm_path()


@torch.no_grad()
def test_minilm_matches_sentence_transformers(model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    config = json.loads((model_dir / "config.json").read_text())
    family = detect_family(config)
    assert isinstance(family, BertFamily)

    # P1: draw a key and transform the real checkpoint
    key = draw_key(family.dims(config))
    state = load_file(str(model_dir / "model.safetensors"))
    cloud, user = transform_state_dict(family, state, key, config)
    assert sorted(user) == sorted(EMBEDDING_NAMES)
    assert not any(n.startswith("embeddings.") for n in cloud)

    # P2: the stock BertModel holding θ′
    cloud_model = family.build_cloud_model(config)
    result = cloud_model.load_state_dict(cloud, strict=False)
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(EMBEDDING_NAMES)

    # P3: tokenize (the tokenizer pads every input to 128), embed, permute; un-permute, pool
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    token_types = torch.tensor([e.type_ids for e in encodings])
    assert int(mask.sum(1).max()) < ids.shape[1]  # nothing truncated
    x = family.embed(user, config, ids, token_type_ids=token_types)
    out = family.cloud_forward(cloud_model, permute(x, key.pi), mask)
    hidden = unpermute(out.output, key.pi)  # (B, 128, 384)
    ours = normalize(mean_pool(hidden, mask))

    # the references: stock BertModel on the original weights, and sentence-transformers
    stock = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    ref_out = stock(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    real = mask.bool()
    d_hidden = max_abs_diff(hidden[real], ref_out.last_hidden_state[real])
    d_pooled = max_abs_diff(unpermute(out.pooled, key.pi), ref_out.pooler_output)

    st_model = SentenceTransformer(str(model_dir), device="cpu")
    ref = st_model.encode(SENTENCES, convert_to_tensor=True, batch_size=64).float()
    cosine = (ours * ref).sum(-1) / (ours.norm(dim=-1) * ref.norm(dim=-1))
    print(
        f"\nMiniLM: {len(SENTENCES)} sentences, min cosine {float(cosine.min()):.8f}, "
        f"max|Δ| embedding {max_abs_diff(ours, ref):.2e}, hidden {d_hidden:.2e}, "
        f"pooled {d_pooled:.2e}, {time.perf_counter() - t0:.1f}s"
    )
    assert d_hidden <= 1e-4
    assert d_pooled <= 1e-4
    assert float(cosine.min()) >= MIN_COSINE, cosine
