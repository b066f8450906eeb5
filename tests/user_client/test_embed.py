"""The real all-MiniLM-L6-v2 through the SDK equals sentence-transformers' own encode()."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from shared import api
from tests.sentences import SENTENCES as MINILM_SENTENCES
from tests.support import max_abs_diff
from tests.user_client.conftest import World
from user_client import StipClient

SENTENCES = [
    *MINILM_SENTENCES[:6],  # short ones and questions
    *MINILM_SENTENCES[17:19],  # Japanese, emoji
    *MINILM_SENTENCES[28:30],  # a long one, stray spaces
    "word " * 300,  # longer than max_seq_length (256): truncated as sentence-transformers does
]
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    return model.encode(SENTENCES, convert_to_tensor=True).float()


def test_embed_matches_sentence_transformers(
    reference: torch.Tensor, make_client: Callable[..., StipClient], world: World
) -> None:
    client = make_client("minilm")
    ours = client.embed(SENTENCES, batch_size=4)
    assert ours.shape == reference.shape == (len(SENTENCES), 384)
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1)
    assert float(cosine.min()) >= MIN_COSINE, cosine
    assert max_abs_diff(ours.norm(dim=-1), torch.ones(len(SENTENCES))) <= 1e-5
    # the long sentence was truncated to 256 tokens, not the tokenizer.json's 128
    assert max(f["shape"][1] for f in world.cloud.forwards) == 256
    assert all(f["names"] == [api.ATTENTION_MASK, api.INPUTS_EMBEDS] for f in world.cloud.forwards)


def test_embed_options(make_client: Callable[..., StipClient]) -> None:
    client = make_client("minilm")
    one = client.embed("The cat sat on the mat.")
    batch = client.embed(SENTENCES[:3], batch_size=32)
    assert one.shape == (1, 384)
    assert max_abs_diff(one[0], batch[1]) <= 1e-5  # padding does not change the result
    raw = client.embed(SENTENCES[:3], normalize=False)
    assert max_abs_diff(torch.nn.functional.normalize(raw, dim=-1), batch) <= 1e-6
    assert client.embed([]).shape == (0, 384)


def test_encoder_forward_matches_bert(minilm_dir: Path, make_client: Callable[..., StipClient]) -> None:
    client = make_client("minilm")
    enc = client.bundle.tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    hidden = client.forward(
        enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"]
    )
    with torch.no_grad():
        expected = transformers.BertModel.from_pretrained(minilm_dir).eval()(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    assert max_abs_diff(hidden[real], expected[real]) <= 1e-4


def test_wrong_kind_of_model(make_client: Callable[..., StipClient]) -> None:
    with pytest.raises(ValueError, match="encoder"):
        make_client("llama").embed(["x"])
    with pytest.raises(ValueError, match="decoder"):
        make_client("minilm").generate("x")
