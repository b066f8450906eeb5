"""Measured limits of the protocol: what a curious P2 recovers from what it legitimately holds.

These tests document attacks that WORK (they assert the attack's success rate), so that the
limits in the README rest on measurements, not on belief. A change that closed one of these
holes would fail its test, and the README would have to change with it.
"""

import torch
from safetensors.torch import load_file

from shared.families import get_family
from shared.keys import draw_key
from shared.permutation import permute
from shared.transform import transform_state_dict
from tests.support import TINY_LLAMA, random_causal_lm
from user_client.demo import minilm_path


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x, dim=-1).values


def test_public_embedding_table_reveals_tokens_from_x_pi() -> None:
    """A permutation hides the order of a row's values, not the values: P2 holding the public
    embedding table (a known base model) matches sorted rows and recovers every token."""
    table = load_file(str(minilm_path() / "model.safetensors"))["embeddings.word_embeddings.weight"]
    key = draw_key(get_family("bert").dims({**_minilm_config(), "vocab_size": table.shape[0]}))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1000, table.shape[0], (300,), generator=g)
    x_pi = permute(table[tokens], key.pi)  # what a Llama-family user sends: E[t]·π
    guess = torch.cdist(_sorted_rows(x_pi), _sorted_rows(table)).argmin(dim=1)
    recovered = float((guess == tokens).float().mean())
    assert recovered == 1.0  # measured: 300/300 tokens


def test_tied_head_maps_inputs_to_permuted_vocabulary_indices() -> None:
    """With a tied head P2 holds πᵀ E π_c; each input row x·π equals one of its rows exactly,
    which gives P2 the π_c-index of every input token: a substitution cipher on the tokens."""

    config = dict(
        TINY_LLAMA, num_hidden_layers=1, vocab_size=200, tie_word_embeddings=True, max_position_embeddings=2048
    )
    model = random_causal_lm(config)
    family = get_family("llama")
    key = draw_key(family.dims(config))
    cloud, user = transform_state_dict(family, model.state_dict(), key, config)
    tokens = torch.tensor([5, 17, 5, 199, 42])
    x_pi = permute(family.embed(user, config, tokens[None])[0], key.pi)
    index = torch.cdist(x_pi, cloud["lm_head.weight"]).argmin(dim=1)  # P2's view: rows of its own head
    assert torch.equal(key.pi_c[index], tokens)  # exactly the tokens, up to the secret relabelling π_c
    assert index[0] == index[2]  # repeated tokens are visible as such


def _minilm_config() -> dict:
    import json

    return json.loads((minilm_path() / "config.json").read_text())
