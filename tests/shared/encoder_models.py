"""The tests' small encoders and the paper's Transformer, every parameter random (test_bert,
test_paper, test_refusals, and P2's tests that serve an encoder): one place for their sizes, and
the hypothesis strategies that draw any of them."""

import transformers
from hypothesis import strategies as st

from shared.families.paper import PaperConfig, PaperTransformer
from tests.support import randomize_parameters


def layer_sizes(
    *, n_heads: int = 4, head_dim: int = 8, n_layers: int = 2, d_ff: int = 48, positions: int = 24
) -> dict[str, int]:
    """A small BERT's or paper Transformer's sizes, by their config names."""
    return dict(
        hidden_size=n_heads * head_dim,
        num_attention_heads=n_heads,
        num_hidden_layers=n_layers,
        intermediate_size=d_ff,
        max_position_embeddings=positions,
    )


# hypothesis: any layer_sizes() arguments, and the lengths of a right-padded batch
ANY_SIZES = st.fixed_dictionaries(
    dict(n_heads=st.integers(1, 4), head_dim=st.integers(1, 6), n_layers=st.integers(1, 3), d_ff=st.integers(1, 24))
)
ANY_LENGTHS = st.lists(st.integers(1, 8), min_size=1, max_size=3)


def tiny_bert(*, seed: int = 0, vocab: int = 61, **sizes: int) -> tuple[transformers.BertModel, dict]:
    """A BertModel of `layer_sizes(**sizes)` (4 heads of 8, 2 layers by default), and its config."""
    cfg = transformers.BertConfig(vocab_size=vocab, type_vocab_size=2, **layer_sizes(**sizes))
    model = randomize_parameters(transformers.BertModel(cfg), seed=seed)
    return model, cfg.to_dict()


def tiny_paper(*, causal: bool, seed: int = 0, **sizes: int) -> tuple[PaperTransformer, dict]:
    """The paper's Transformer of `layer_sizes(**sizes)` (4 heads of 8, 2 layers by default), and its config."""
    cfg = PaperConfig(vocab_size=53, causal=causal, **layer_sizes(**sizes))
    return randomize_parameters(PaperTransformer(cfg), seed=seed), cfg.to_json()
