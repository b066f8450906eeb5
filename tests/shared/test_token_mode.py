"""Token mode's θ′ (PROTOCOL.md section 7): a complete stock causal LM over ids relabelled by π_c.

θ′ with E′ = E[π_c][:, π] (GPT-2: also wpe[:, π]) loads into the stock class with every
parameter present, and its `generate()` on relabelled ids argsort(π_c)[t] gives, mapped back
through π_c, exactly the plaintext model's tokens; its logits are the plaintext ones permuted by π_c.
"""

from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from shared.errors import UnsupportedModel
from shared.families import get_family
from shared.transform import check_mode, transform_state_dict
from tests.support import TINY_GPT2, TINY_LLAMA, assert_close, checkpoint_state, nonidentity_key, random_causal_lm

GPT2 = dict(TINY_GPT2, vocab_size=200)
CASES = {  # name: (family, config, seed); seeds whose greedy continuation is not one token repeated
    "llama-gqa-untied": ("llama", TINY_LLAMA, 3),
    "llama-gqa-tied": ("llama", dict(TINY_LLAMA, tie_word_embeddings=True), 3),
    "gpt2": ("gpt2", GPT2, 4),
}
NEW = 20


def _relabelled(name: str) -> tuple[Any, Any, torch.Tensor]:
    family_name, config, seed = CASES[name]
    original = random_causal_lm(config, seed=seed)
    family = get_family(family_name)
    cfg = original.config.to_dict()
    key = nonidentity_key(family.dims(cfg))
    cloud, _ = transform_state_dict(family, checkpoint_state(original), key, cfg, mode="token")
    model = family.build_cloud_model(cfg).eval()
    model.load_state_dict(family.module_state(cloud, cfg), strict=True)  # nothing left out: E′ included
    model.generation_config = GenerationConfig()  # as P2 does: no real token id applies
    return original, model, key.pi_c


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generate_on_relabelled_ids_equals_plaintext(name: str) -> None:
    original, relabelled, pi_c = _relabelled(name)
    prompt = torch.tensor([[5, 17, 3, 40, 22, 9, 58]])
    with torch.no_grad():
        ref = original.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
        relabelled_prompt = torch.argsort(pi_c)[prompt]
        out = relabelled.generate(  # the mask given, as P2 gives it: a relabelled 0 is no padding
            relabelled_prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False
        )
        logits = relabelled(relabelled_prompt).logits
        ref_logits = original(prompt).logits
    real = pi_c[out[0, prompt.shape[1] :]]
    assert real.tolist() == ref[0, prompt.shape[1] :].tolist()
    assert len(set(real.tolist())) > 3  # a real continuation
    assert_close(ref_logits[..., pi_c], logits)  # logit j is that of token π_c[j]


def test_token_mode_needs_a_decoder() -> None:
    with pytest.raises(UnsupportedModel, match="token mode needs a decoder"):
        check_mode(get_family("bert"), "token")
    with pytest.raises(ValueError, match="mode must be one of"):
        check_mode(get_family("llama"), "tokens")
    assert check_mode(get_family("llama"), "token") and not check_mode(get_family("bert"), "embeds")


def test_embeds_mode_cloud_holds_no_token_table() -> None:
    original = random_causal_lm(GPT2, seed=3)
    family, cfg = get_family("gpt2"), original.config.to_dict()
    key = nonidentity_key(family.dims(cfg))
    embeds, _ = transform_state_dict(family, checkpoint_state(original), key, cfg)
    token, user = transform_state_dict(family, checkpoint_state(original), key, cfg, mode="token")
    assert "transformer.wte.weight" not in embeds and not embeds["transformer.wpe.weight"].any()
    assert torch.equal(token["transformer.wpe.weight"], user["transformer.wpe.weight"][:, key.pi])
    assert torch.equal(token["transformer.wte.weight"], user["transformer.wte.weight"][key.pi_c][:, key.pi])
    assert set(token) - set(embeds) == {"transformer.wte.weight"}
