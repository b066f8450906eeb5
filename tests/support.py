"""Helpers shared by the tests: randomised stock models and comparison utilities."""

from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from shared.families import Family
from shared.keys import DeveloperKey, LayerKey, ModelDims, draw_key
from shared.permutation import permute, random_permutation, unpermute
from shared.transform import transform_state_dict
from stip_demo.models import random_causal_lm as random_causal_lm  # bench.engines uses it too
from stip_demo.models import randomize_parameters as randomize_parameters  # the demo's models use it too

# The tests' small random Llama (GQA 4:2, untied); suites override a field or two.
TINY_LLAMA: dict[str, Any] = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=61,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)
# and GPT-2 of the same width (MHA, tied head, learned positions)
TINY_GPT2: dict[str, Any] = dict(
    model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=32, n_head=4, n_layer=2, vocab_size=61, n_positions=64
)


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors as `save_pretrained` writes them: transformers' load-time conversion reverted
    (per-expert MoE tensors, ViT's `encoder.layer.*` names). The same as `state_dict()` for the
    families without a conversion (Llama, GPT-2, BERT)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, model.state_dict()))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


TOL = 1e-4  # fp32 exactness bound on outputs of order 1 (PROTOCOL.md section 2)


def assert_close(ref: torch.Tensor, got: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    assert 0.5 < float(ref.abs().max()) < 50  # logits of order 1-10: the tolerance means something
    delta = max_abs_diff(ref, got)
    assert delta <= TOL, f"max |Δ| = {delta:.3g}"


def left_padded(batch: int, seq: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, S) and a mask with row b padded on the left by b tokens (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        mask[b, :b] = 0
        ids[b, :b] = 0
    return ids, mask


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """What generate() passes as position_ids for a padded batch: real tokens count from 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def nonidentity(n: int) -> torch.Tensor:
    while True:
        p = random_permutation(n)
        if not torch.equal(p, torch.arange(n)):
            return p


def nonidentity_key(dims: ModelDims) -> DeveloperKey:
    """A valid key where every permutation, inner ones included, moves something.

    GQA groups are respected; the within-head Q/K permutation exists only without RoPE; MoE
    layers get their expert and per-expert permutations.
    """
    g = dims.group_size
    layers = []
    for _ in range(dims.n_layers):
        kv_head = nonidentity(dims.n_kv_heads)
        head = torch.cat(
            [
                kv_head[c] * g + (nonidentity(g) if g > 1 else torch.zeros(1, dtype=torch.int64))
                for c in range(dims.n_kv_heads)
            ]
        )
        qk = None if dims.rope else torch.stack([nonidentity(dims.head_dim) for _ in range(dims.n_kv_heads)])
        v = torch.stack([nonidentity(dims.head_dim) for _ in range(dims.n_kv_heads)])
        moe: dict[str, torch.Tensor] = {}
        if dims.n_experts:  # mixture of experts: the experts' order and each expert's hidden units
            moe["experts"] = nonidentity(dims.n_experts)
            moe["expert_ffn"] = torch.stack([nonidentity(dims.d_expert) for _ in range(dims.n_experts)])
        if dims.d_shared:
            moe["shared_ffn"] = nonidentity(dims.d_shared)
        layers.append(LayerKey(kv_head=kv_head, head=head, qk=qk, v=v, ffn=nonidentity(dims.d_ff), **moe))
    key = draw_key(dims)
    user = replace(key.user, pi=nonidentity(dims.d_model), pi_c=nonidentity(dims.d_out))
    return DeveloperKey(user=user, dims=dims, layers=tuple(layers))


# --- a decoder through the protocol, in process: P1 transforms, P2 runs θ′, P3 embeds and samples


class Deployment(NamedTuple):
    """A decoder deployed in process (deploy_decoder): P1's key, P2's stock model on θ′, P3's
    embedding module. P3 embeds and permutes, P2 runs θ′, P3 un-permutes and samples."""

    family: Family
    config: dict
    key: DeveloperKey
    cloud_model: nn.Module
    user: dict[str, torch.Tensor]

    @torch.no_grad()
    def logits(
        self, ids: torch.Tensor, mask: torch.Tensor | None, cache: object = None, last_only: bool = False
    ) -> tuple[torch.Tensor, object]:
        """P3 embeds (learned positions at the offsets its mask implies; RoPE families ignore them)
        and permutes, P2 runs θ′, P3 un-permutes: plaintext logits (B, S or 1, V) and the cache."""
        offset: int | torch.Tensor = 0
        if mask is not None:  # mask (B, past + S): row b's real tokens so far start at position 0
            offset = mask.shape[1] - ids.shape[1] - (mask == 0).sum(-1)
        elif cache is not None:
            offset = cache.get_seq_length()  # type: ignore[attr-defined]
        x = self.family.embed(self.user, self.config, ids, position_offset=offset)  # type: ignore[arg-type]
        out = self.family.cloud_forward(self.cloud_model, permute(x, self.key.pi), mask, cache, last_only)  # by π_c
        return unpermute(out.output, self.key.pi_c), out.cache

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy decoding on the user side, one row per step sent to P2, which keeps the cache and
        computes the head on the last position only (as it serves output=last)."""
        logits, cache = self.logits(ids, mask, last_only=True)
        tokens = []
        for step in range(n):
            assert logits.shape[1] == 1
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(nxt)
            if step == n - 1:
                break
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            logits, cache = self.logits(nxt, mask, cache, last_only=True)
        return torch.cat([ids, *tokens], dim=1)


def deploy_decoder(family: Family, model: nn.Module, embed_name: str, key: DeveloperKey | None = None) -> Deployment:
    """P1 transforms, P2 loads θ′ into the stock class; `embed_name` is the token table's name,
    the one tensor P2 must lack."""
    config = model.config.to_dict()
    key = key or draw_key(family.dims(config))
    cloud, user = transform_state_dict(family, checkpoint_state(model), key, config)
    cloud_model = family.build_cloud_model(config).eval()
    missing, unexpected = cloud_model.load_state_dict(family.module_state(cloud, config), strict=False)
    assert unexpected == []
    assert missing == [embed_name]  # P2 never receives the token table ...
    with torch.no_grad():  # ... and never uses its own: NaN would poison every output
        cloud_model.get_input_embeddings().weight.fill_(float("nan"))
    return Deployment(family, config, key, cloud_model, user)


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def malleated(token: str) -> dict[str, str]:
    """Other spellings of a credential's signature that a lenient base64 decoder reads as the
    same bytes (so the signature still verifies). The signature must hold a '-' or a '_'
    (see `malleable`): the `+/` form swaps them for the standard alphabet's."""
    head, _, sig = token.rpartition(".")
    assert len(sig) % 4 == 2, "an Ed25519 signature is 86 characters: 4 unused bits in the last"
    flipped = B64URL[B64URL.index(sig[-1]) ^ 1]  # the lowest unused bit of the last character
    forms = {
        "junk characters": f"{sig[:10]}****{sig[10:]}",
        "+/ alphabet": sig.replace("-", "+").replace("_", "/"),
        "padding": f"{sig}==",
        "extra padding": f"{sig}===",
        "unused bits": sig[:-1] + flipped,
    }
    assert all(f != sig for f in forms.values())
    return {k: f"{head}.{f}" for k, f in forms.items()}


def malleable(issue: Callable[[], str], attempts: int = 50) -> str:
    """The first credential `issue()` gives whose signature holds '-' or '_' (93 % of them do)."""
    for _ in range(attempts):
        token = issue()
        if set(token.rpartition(".")[2]) & {"-", "_"}:
            return token
    raise AssertionError(f"no signature with '-' or '_' in {attempts} credentials")
