"""Measured limits of the protocol: what a curious P2 recovers from what it legitimately holds.

These tests run the attack lab (`attack_lab`, `stip audit`) at reduced sizes and assert that
each attack WORKS where SECURITY.md says it does, and that each knob changes the figure it
claims to change. A change that weakened the lab, or closed a hole, fails here, and
SECURITY.md would have to change with it. Keys are used only to score.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attack_lab import cipher, corpus, embedding, linking, scenario, weights
from attack_lab.cli import build_parser
from shared.families import get_family
from shared.permutation import permute
from stip_demo.models import minilm_path
from tests.support import TINY_LLAMA, random_causal_lm, randomize_parameters

LLAMA = get_family("llama")
TIED = dict(TINY_LLAMA, vocab_size=500, tie_word_embeddings=True, max_position_embeddings=256)


@pytest.fixture(scope="module")
def minilm_table() -> torch.Tensor:
    return load_file(str(minilm_path() / "model.safetensors"))["embeddings.word_embeddings.weight"]


@pytest.fixture(scope="module")
def tied() -> scenario.Deployment:
    return scenario.deploy("tiny-tied", LLAMA, TIED, random_causal_lm(TIED).state_dict())


@pytest.fixture(scope="module")
def untied() -> scenario.Deployment:
    config = dict(TIED, tie_word_embeddings=False)
    return scenario.deploy("tiny-untied", LLAMA, config, random_causal_lm(config, seed=1).state_dict())


# --- 1 embedding matching ----------------------------------------------------------------------


def test_public_embedding_table_reveals_tokens_from_x_pi(minilm_table: torch.Tensor) -> None:
    """A permutation hides the order of a row's values, not the values: P2 holding the public
    embedding table (a known base model) matches sorted rows and recovers every token."""
    pi = torch.randperm(minilm_table.shape[1])
    tokens = torch.randint(1000, minilm_table.shape[0], (300,), generator=torch.Generator().manual_seed(0))
    x_pi = permute(minilm_table[tokens], pi)  # what a Llama-family user sends: E[t]·π
    assert torch.equal(embedding.match_embedding_rows(x_pi, minilm_table), tokens)  # measured: 300/300


def test_encoder_inputs_with_positions_and_layernorm_reveal_tokens() -> None:
    """MiniLM's real inputs, LayerNorm(word + position + type)·π, from the real tokenizer: P2
    builds each position's candidate table from the public embedding module."""
    family, config, w = scenario.minilm()
    dep = scenario.deploy("minilm", family, config, w)
    tok = corpus.tokenizer()
    tok.enable_truncation(5)
    ids = torch.tensor([e.ids for e in tok.encode_batch(["A man is riding a horse.", "The girl carried a baby."])])
    x_pi = permute(family.embed(dep.user, config, ids), dep.key.pi)
    assert torch.equal(embedding.match_bert_rows(x_pi, dep.public, config), ids)


def test_orthogonal_rotation_instead_of_a_permutation_keeps_norms(minilm_table: torch.Tensor) -> None:
    """The knob 'rotate instead of permute' (not even exact for STIP's norms) fails against
    norm matching: ‖x·Q‖ = ‖x‖ picks the token among MiniLM's 30522 rows."""
    q = embedding.random_orthogonal(minilm_table.shape[1])
    tokens = torch.randint(1000, minilm_table.shape[0], (300,), generator=torch.Generator().manual_seed(1))
    hit = (embedding.norm_matching(minilm_table[tokens] @ q, minilm_table) == tokens).float().mean()
    assert hit > 0.95
    assert (embedding.match_embedding_rows(minilm_table[tokens] @ q, minilm_table) == tokens).float().mean() < 0.05


# --- 3 tied-head lookup (and the tied/untied knob) -------------------------------------------------


def _rows(dep: scenario.Deployment, tokens: torch.Tensor) -> torch.Tensor:
    return permute(LLAMA.embed(dep.user, dep.config, tokens[None])[0], dep.key.pi)


def test_tied_head_maps_inputs_to_permuted_vocabulary_indices(tied: scenario.Deployment) -> None:
    """With a tied head P2 holds πᵀ E π_c; each input row x·π equals one of its rows exactly,
    which gives P2 the π_c-index of every input token: a substitution cipher on the tokens."""
    tokens = torch.tensor([5, 17, 5, 499, 42])
    index = embedding.tied_head_lookup(_rows(tied, tokens), tied.cloud["lm_head.weight"])
    assert torch.equal(tied.key.pi_c[index], tokens)  # exactly the tokens, up to the secret relabelling π_c
    assert index[0] == index[2]  # repeated tokens are visible as such


def test_untied_head_defeats_the_lookup(untied: scenario.Deployment) -> None:
    tokens = torch.arange(500)
    index = embedding.tied_head_lookup(_rows(untied, tokens), untied.cloud["lm_head.weight"])
    assert (untied.key.pi_c[index] == tokens).float().mean() < 0.05  # chance is 1/500


# --- 2 generation linking ----------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_greedy_generation_traffic_labels_rows_with_their_index(head: str, request: pytest.FixtureRequest) -> None:
    """From the traffic alone: P2 answers top-1, the next row is that token's; every label right,
    tied or untied head, and a later prompt that repeats generated text is labelled in full."""
    dep: scenario.Deployment = request.getfixturevalue(head)
    traffic = linking.simulate_generations(dep, [[1, 2, 3], [7, 8]], 12)
    book = linking.build_dictionary(traffic, range(2))
    generated = {int(t) for toks in traffic.tokens[0][1:] + traffic.tokens[1][1:] for t in toks}
    assert len(book) == len(generated)  # one label per distinct generated token ...
    history = [int(t) for toks in traffic.tokens[0][1:] for t in toks]  # ... and a chat that re-sends it
    later = linking.simulate_generations(dep, [history], 1)
    later.rows = traffic.rows + later.rows
    later.tokens = traffic.tokens + later.tokens
    s = linking.score_dictionary(book, later, range(2), range(2, 3), dep.key.pi_c)
    assert s.correct == 1.0
    assert s.labelled == 1.0


def test_sampled_generation_labels_are_right(untied: scenario.Deployment) -> None:
    traffic = linking.simulate_generations(untied, [[1, 2, 3]] * 4, 16, temperature=1.0, top=3)
    book = linking.build_dictionary(traffic, range(4))
    assert book  # repeated rows resolve their candidate sets
    assert linking.score_dictionary(book, traffic, range(4), range(0), untied.key.pi_c).correct == 1.0


# --- 4 frequency analysis (and the key-rotation knob's per-key figure) --------------------------


def test_frequency_analysis_of_real_english_with_public_statistics() -> None:
    """The cipher of 10k tokens of English falls to public statistics (`stip audit`: 45%, 41-53% over
    3 relabellings; rank only 10%);
    a key that lives for 1k tokens only leaks much less: what rotation buys, if versions could
    not be linked (they can: the next test)."""
    stream = corpus.token_stream(corpus.NEW_TESTAMENT)
    # one fixed relabelling: the attack's tie-breaking depends on it, and an unseeded one let the
    # 1k-token figure reach 0.138 against 0.395 at 10k once (the bound below is a third)
    pi_c = torch.randperm(30522, generator=torch.Generator().manual_seed(0)).numpy()
    stats = corpus.bible_stats(30522)
    big = cipher.frequency_analysis(stream[:10000], pi_c, stats)
    small = cipher.frequency_analysis(stream[:1000], pi_c, stats)
    assert big.refined is not None and small.refined is not None
    assert big.refined > 0.3
    assert big.refined > big.rank_only + 0.15  # the bigram refinement is what works
    assert max(small.refined, small.rank_only) < big.refined / 3


# --- 5 weight matching, and the rotation / per-group knobs ---------------------------------------------


def _score(dep: scenario.Deployment, reference: dict) -> weights.WeightScore:
    found = weights.match_weights(dep.cloud, reference, dep.family.name)
    pi_c = None if dep.family.is_encoder else dep.key.pi_c
    return weights.score(found, dep.key.pi, pi_c, weights.true_inner(dep))


def test_weight_matching_recovers_every_permutation_from_the_public_base(tied: scenario.Deployment) -> None:
    s = _score(tied, weights.reference_from_base(tied))
    assert (s.pi, s.pi_c, s.inner) == (1.0, 1.0, 1.0)


def test_weight_matching_survives_a_fine_tune_of_the_base() -> None:
    base = random_causal_lm(TIED).state_dict()
    dep = scenario.deploy("tuned", LLAMA, TIED, scenario.perturbed(base, 0.1), public=base)
    s = _score(dep, weights.reference_from_base(dep))
    assert min(s.pi, s.pi_c or 0.0, s.inner) > 0.99


def test_weight_matching_on_an_encoder() -> None:
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    model = randomize_parameters(transformers.BertModel(config))
    dep = scenario.deploy("tiny-bert", get_family("bert"), model.config.to_dict(), model.state_dict())
    s = _score(dep, weights.reference_from_base(dep))
    assert (s.pi, s.inner) == (1.0, 1.0)


def test_rotation_and_other_groups_are_linked_by_matching_their_weights(tied: scenario.Deployment) -> None:
    """Key rotation and per-group deployments give P2 a second θ′ of the same model: matched to
    the first, with no public knowledge, it maps the new cipher onto the old one; with one
    colluding user's key of group A it yields group B's key."""
    other = scenario.redeploy(tied, random_causal_lm(TIED).state_dict())
    found = weights.match_weights(other.cloud, tied.cloud, "llama")
    assert found.pi_c is not None
    assert torch.equal(found.pi_c, torch.argsort(tied.key.pi_c)[other.key.pi_c])  # the cipher carries over
    assert torch.equal(tied.key.pi[found.pi], other.key.pi)  # group B's key from group A's
    assert torch.equal(tied.key.pi_c[found.pi_c], other.key.pi_c)


# --- token mode (issue 12) and the CLI ---------------------------------------------------------------


def test_token_mode_table_reveals_pi_c_for_every_token(tied: scenario.Deployment) -> None:
    table = tied.user["model.embed_tokens.weight"]
    e_prime = table[tied.key.pi_c][:, tied.key.pi]  # what token mode would hand P2
    guess = embedding.nearest_rows(embedding.sorted_rows(e_prime), embedding.sorted_rows(table))
    assert torch.equal(guess, tied.key.pi_c)


def test_stip_audit_help_documents_the_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    from user_client.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["audit", "--help"])  # `stip audit --help`, dispatched to attack_lab.cli
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text == build_parser().format_help()
    for name in ("embedding matching", "generation linking", "tied-head lookup", "frequency analysis"):
        assert name in text
    for name in ("weight matching", "brute force", "key rotation", "per-group", "token mode", "offline"):
        assert name in text


def test_weight_matching_on_a_p2_data_directory(tmp_path: Path, tied: scenario.Deployment) -> None:
    """`stip audit --cloud-data-dir`: P2's files alone (cloud_service.storage's layout) and the base."""
    import json

    from safetensors.torch import save_file

    from attack_lab import p2_data
    from shared.api import PUSH_CONFIG, PUSH_FAMILY

    base = tmp_path / "base"
    random_causal_lm(TIED).save_pretrained(base)  # the same weights as the fixture's (seed 0)
    dep_dir = tmp_path / "cloud" / "deployments" / "dep-1"
    dep_dir.mkdir(parents=True)
    meta = {PUSH_FAMILY: "llama", PUSH_CONFIG: json.dumps(LLAMA.cloud_config(TIED))}
    save_file(tied.cloud, str(dep_dir / "v3.safetensors"), metadata=meta)
    record = {"deployment_id": "dep-1", "key_version": 3, "file": "v3.safetensors", "sha256": "-", "size": 0}
    (dep_dir / "active.json").write_text(json.dumps(record | {"activated_at": 0}))
    [result] = p2_data.audit_data_dir(tmp_path / "cloud", base)
    assert (result.deployment_id, result.key_version, result.max_delta) == ("dep-1", 3, 0.0)
