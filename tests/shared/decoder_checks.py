"""The checks every decoder family runs against its stock class (test_decoders runs them over
every variant of decoder_models; test_gpt2, test_llama and test_moe reuse them).

One scaffold: a family's model comes from decoder_models' table, and these check it. P1 transforms,
P2 runs θ′ in the stock class, P3 embeds, permutes and un-permutes (tests.support.deploy_decoder,
Deployment); the reference is the original model in transformers. Positions of a left-padded
batch are generate()'s own (tests.support.generate_positions)."""

import torch
from torch import nn

from tests.shared.decoder_models import Decoder
from tests.support import assert_close, generate_positions, left_padded


def assert_matches_stock(decoder: Decoder, model: nn.Module) -> None:
    """An unpadded batch (3, 9): every position's logits within the fp32 bound."""
    deployed, vocab = decoder.deploy(model), decoder.vocab
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    got, _ = deployed.logits(ids, None)
    assert_close(ref, got)


def padded_logits(
    decoder: Decoder, model: nn.Module, batch: int = 3, seq: int = 8, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the real (unpadded) positions of a left-padded batch: (reference, through STIP)."""
    deployed, vocab = decoder.deploy(model), decoder.vocab
    ids, mask = left_padded(batch, seq, vocab=vocab, seed=seed)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=generate_positions(mask)).logits
    got, _ = deployed.logits(ids, mask)
    real = mask.bool()  # padded positions carry no meaning
    return ref[real], got[real]


def assert_kv_cache_matches_full_forward(decoder: Decoder, model: nn.Module, *, padded: bool = True) -> None:
    """A prefill of 5, then one row per step with P2's cache: the logits of one full forward."""
    deployed, vocab = decoder.deploy(model), decoder.vocab
    ids, mask = left_padded(3, 10, vocab=vocab)
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=generate_positions(mask)).logits
    prefill = 5
    logits, cache = deployed.logits(ids[:, :prefill], mask[:, :prefill])
    steps = [logits]
    for t in range(prefill, ids.shape[1]):  # one new row per step; P2 keeps the cache
        logits, cache = deployed.logits(ids[:, t : t + 1], mask[:, : t + 1], cache)
        steps.append(logits)
    real = mask.bool()
    assert_close(ref[real], torch.cat(steps, dim=1)[real])


def assert_greedy_matches_generate(decoder: Decoder, model: nn.Module) -> None:
    """8 greedy tokens for a left-padded batch (2, 6): exactly transformers' generate()."""
    deployed, vocab = decoder.deploy(model), decoder.vocab
    ids, mask = left_padded(2, 6, vocab=vocab)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
    got = deployed.greedy(ids, mask, 8)
    assert got.shape == (2, 14)
    assert torch.equal(ref, got)
