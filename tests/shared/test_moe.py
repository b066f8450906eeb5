"""The mixture-of-experts families against the stock MixtralForCausalLM and Qwen2MoeForCausalLM,
with every parameter randomised (norms, router, experts, shared expert, Q/K/V biases).

P1 transforms the checkpoint as `save_pretrained` writes it (one tensor per expert), P2 loads
θ′ into the stock class (experts fused as transformers fuses them; its embedding table NaN), P3
embeds, sends x·π and un-permutes the logits with π_c. The routing is compared token by token.
"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared.checkpoint import transform_model_dir
from shared.errors import CheckpointError, KeyFormatError
from shared.families.llama import EMBED, HEAD
from shared.keys import DeveloperKey, draw_key
from shared.permutation import permute
from shared.runtime import load_cloud_model
from shared.transform import transform_state_dict
from tests.shared.decoder_checks import padded_logits
from tests.shared.decoder_models import DECODERS, decoder_model, variant_model
from tests.shared.family_checks import assert_each_permutation_moves
from tests.support import TOL, checkpoint_state, max_abs_diff, nonidentity_key

MIXTRAL, QWEN2_MOE = DECODERS["mixtral"], DECODERS["qwen2_moe"]
VOCAB = MIXTRAL.vocab


# --- the routing ----------------------------------------------------------------------------


def _record_routing(model: torch.nn.Module) -> tuple[list[tuple[torch.Tensor, ...]], list]:
    """Hook every router: (logits (T, E), weights (T, k), chosen experts (T, k)) per sparse layer."""
    seen: list[tuple[torch.Tensor, ...]] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o: seen.append(tuple(t.detach() for t in o)))
        for layer in model.model.layers
        if hasattr(layer.mlp, "experts")
    ]
    return seen, hooks


@pytest.mark.parametrize("variant", ["mixtral-top3-of-5", "qwen2_moe-normtopk-dense"])
def test_routing_is_identical_token_by_token(variant: str) -> None:
    decoder, model = variant_model(variant)
    family = decoder.family
    _, config, key, cloud_model, user = decoder.deploy(model, nonidentity_key(family.dims(model.config.to_dict())))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    ref, ref_hooks = _record_routing(model)
    got, got_hooks = _record_routing(cloud_model)
    try:
        with torch.no_grad():
            model(input_ids=ids)
            x = family.embed(user, config, ids)
            family.cloud_forward(cloud_model, permute(x, key.pi), None)
    finally:
        for h in ref_hooks + got_hooks:
            h.remove()
    sparse = [i for i in range(config["num_hidden_layers"]) if family.is_sparse(config, i)]  # type: ignore[attr-defined]
    assert len(ref) == len(got) == len(sparse) > 0
    k = config["num_experts_per_tok"]
    for layer, (r_logits, r_weights, r_experts), (g_logits, g_weights, g_experts) in zip(sparse, ref, got, strict=True):
        sigma = key.layers[layer].experts  # transformed expert j is original expert sigma[j]
        assert sigma is not None and not torch.equal(sigma, torch.arange(sigma.numel()))
        probs = r_logits.softmax(-1).sort(-1, descending=True).values
        if k < probs.shape[-1]:  # no near-tie at the top-k boundary, so the choice is well defined
            assert float((probs[:, k - 1] - probs[:, k]).min()) > 1e-4
        assert max_abs_diff(r_logits, g_logits[:, torch.argsort(sigma)]) <= TOL  # router rows moved with σ
        assert torch.equal(sigma[g_experts], r_experts)  # the same experts, in the same order
        assert max_abs_diff(r_weights, g_weights) <= TOL  # with the same weights (a softmax of the logits above)


# --- every permutation changes P2's weights ------------------------------------------------------


def _affected(part: str, cloud: dict[str, torch.Tensor], key: DeveloperKey) -> set[str]:
    """The cloud tensors a permutation must change (and no others)."""
    inner = ("q_proj.bias", "k_proj.bias", "v_proj.bias")
    if part == "pi":  # everything that reads or writes the residual stream
        return {n for n in cloud if not n.endswith(inner)}
    if part == "shared_ffn":
        return {n for n in cloud if ".shared_expert." in n}
    if part == "expert_ffn":
        return {n for n in cloud if ".experts." in n}
    moved = set()  # experts: the router, and the experts whose position σ changes
    for n in cloud:
        parts = n.split(".")
        if n.endswith("mlp.gate.weight"):
            moved.add(n)
        elif "experts" in parts:
            sigma = key.layers[int(parts[2])].experts
            assert sigma is not None
            j = int(parts[parts.index("experts") + 1])
            if int(sigma[j]) != j:
                moved.add(n)
    return moved


@pytest.mark.parametrize("part", ["pi", "experts", "expert_ffn", "shared_ffn"])
def test_each_permutation_changes_the_cloud_weights(part: str) -> None:
    model = QWEN2_MOE.model()
    assert_each_permutation_moves(QWEN2_MOE.family, checkpoint_state(model), model.config.to_dict(), part, _affected)


def test_mixtral_experts_move_with_their_router_rows() -> None:
    model = MIXTRAL.model()
    config = model.config.to_dict()
    family = MIXTRAL.family
    state = checkpoint_state(model)
    key = nonidentity_key(family.dims(config))
    cloud, user = transform_state_dict(family, state, key, config)
    assert set(user) == {EMBED} and not any("embed" in n for n in cloud)
    lk = key.layers[0]
    assert lk.experts is not None and lk.expert_ffn is not None
    p = "model.layers.0.block_sparse_moe."
    assert torch.equal(cloud[p + "gate.weight"], state[p + "gate.weight"][lk.experts][:, key.pi])
    for j, e in enumerate(lk.experts.tolist()):
        h = lk.expert_ffn[e]  # the hidden units of original expert e
        assert torch.equal(cloud[p + f"experts.{j}.w1.weight"], state[p + f"experts.{e}.w1.weight"][h][:, key.pi])
        assert torch.equal(cloud[p + f"experts.{j}.w3.weight"], state[p + f"experts.{e}.w3.weight"][h][:, key.pi])
        assert torch.equal(cloud[p + f"experts.{j}.w2.weight"], state[p + f"experts.{e}.w2.weight"][key.pi][:, h])
    assert torch.equal(cloud[HEAD], state[HEAD][key.pi_c][:, key.pi])


# --- θ′ on disk loads into the stock class as transformers loads it -----------------------------


@pytest.mark.parametrize("variant", ["mixtral-top2", "qwen2_moe-normtopk-dense"])
def test_cloud_dir_loads_with_from_pretrained_as_on_p2(variant: str, tmp_path: Path) -> None:
    _, model = variant_model(variant)
    model.save_pretrained(tmp_path / "model")
    result = transform_model_dir(tmp_path / "model", tmp_path / "out", progress=False)
    on_p2 = load_cloud_model(
        transformers.AutoConfig.from_pretrained(tmp_path / "out" / "cloud").to_dict(), result.cloud_files
    ).model
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "cloud")
    theirs = dict(stock.named_parameters())
    ours = {n: p for n, p in on_p2.named_parameters() if n != EMBED}  # P2's is an empty placeholder
    assert set(ours) == set(theirs) - {EMBED}
    for n, p in ours.items():
        assert torch.equal(p, theirs[n]), n
    ids = torch.randint(1, VOCAB, (2, 7))
    x = permute(torch.nn.functional.embedding(ids, model.model.embed_tokens.weight), result.key.pi)
    with torch.no_grad():
        assert torch.equal(stock(inputs_embeds=x).logits, on_p2(inputs_embeds=x).logits)


def test_developer_key_keeps_the_expert_permutations(tmp_path: Path) -> None:
    key = draw_key(QWEN2_MOE.family.dims(QWEN2_MOE.config().to_dict()))
    key.save(tmp_path / "key.safetensors")
    back = DeveloperKey.load(tmp_path / "key.safetensors")
    for a, b in zip(key.layers, back.layers, strict=True):
        for name in ("experts", "expert_ffn", "shared_ffn"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert back.dims == key.dims and back.dims.n_experts == 4 and back.dims.d_shared == 20
    with safe_open(str(tmp_path / "key.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "key.safetensors"))
    del tensors["layers.1.expert_ffn"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(KeyFormatError, match="layer 1 lacks its expert permutations"):
        DeveloperKey.load(tmp_path / "cut.safetensors")


# --- bad checkpoints ---------------------------------------------------------------------------


def test_bad_checkpoints_are_refused_by_name() -> None:
    model = MIXTRAL.model()
    config = model.config.to_dict()
    family = MIXTRAL.family
    key = draw_key(family.dims(config))
    state = checkpoint_state(model)
    w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    with pytest.raises(CheckpointError, match="experts.1.w1"):
        transform_state_dict(family, dict(state, **{w1: state[w1][:-1]}), key, config)
    for name in (
        "model.layers.0.mlp.experts.gate_up_proj",  # the fused in-memory layout, not a checkpoint's
        "model.layers.0.block_sparse_moe.experts.4.w1.weight",  # only experts 0..3
        "model.layers.0.block_sparse_moe.experts.0.w4.weight",
        "model.layers.0.mlp.gate_proj.weight",  # a dense MLP in a sparse layer
    ):
        with pytest.raises(CheckpointError, match="unexpected"):
            family.transform(name, torch.zeros(24, 32), key, config)
    cloud, _ = transform_state_dict(family, state, key, config)
    del cloud["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    with pytest.raises(CheckpointError, match=r"layer 1's experts are incomplete.*w2\[2\]"):
        family.module_state(cloud, config)
    plain = replace(key, layers=tuple(replace(lk, experts=None, expert_ffn=None) for lk in key.layers))
    with pytest.raises(CheckpointError, match="expert permutations"):
        transform_state_dict(family, state, plain, config)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["mixtral", "qwen2_moe"]),
    n_experts=st.integers(2, 6),
    top_k=st.integers(1, 3),
    d_expert=st.sampled_from([4, 8, 12]),  # the stock grouped GEMM wants 16-byte strides
    n_layers=st.integers(1, 3),
    tied=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_dims(
    kind: str, n_experts: int, top_k: int, d_expert: int, n_layers: int, tied: bool, seed: int
) -> None:
    experts = {"num_local_experts": n_experts} if kind == "mixtral" else {"num_experts": n_experts}
    sizes = {"intermediate_size": d_expert} if kind == "mixtral" else {"moe_intermediate_size": d_expert}
    decoder, model = decoder_model(
        kind, seed, num_experts_per_tok=min(top_k, n_experts), num_hidden_layers=n_layers, tie_word_embeddings=tied,
        **experts, **sizes,
    )  # fmt: skip
    ref, got = padded_logits(decoder, model, 2, 5, seed=seed)
    assert max_abs_diff(ref, got) <= TOL
