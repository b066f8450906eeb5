"""The ViT families against the stock ViTForImageClassification and ViTModel, with every
parameter randomised (LayerNorm weights and biases, Q/K/V biases, patch embedding, class
token, position embeddings, classifier, pooler).

P1 transforms the checkpoint as `save_pretrained` writes it, P2 loads θ′ into the stock class
(renamed as transformers renames it) and runs the encoder on x·π, P3 embeds the pixels
locally and un-permutes the class logits with π_c (hidden states and pooled output with π).
"""

from pathlib import Path

import pytest
import torch
import transformers

from shared.checkpoint import transform_model_dir
from shared.errors import BadTensor, CheckpointError
from shared.families import detect_family, get_family
from shared.families.vit import CLASSIFIER_W, EMBEDDING_NAMES
from shared.keys import DeveloperKey, draw_key
from shared.permutation import permute, unpermute
from shared.runtime import load_cloud_model
from shared.transform import transform_state_dict
from tests.shared.family_checks import Moves, assert_each_permutation_moves, assert_refused_by_name
from tests.support import assert_close, checkpoint_state, max_abs_diff, randomize_parameters

CLASSIFIER, ENCODER = get_family("vit"), get_family("vit_model")


def tiny_vit(
    cls: type = transformers.ViTForImageClassification, seed: int = 0, pool: bool = True, **kw: object
) -> torch.nn.Module:
    args: dict[str, object] = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=4,
        num_labels=7,
    )
    args.update(kw)
    config = transformers.ViTConfig(**args)
    torch.manual_seed(seed)
    model = cls(config, add_pooling_layer=pool) if cls is transformers.ViTModel else cls(config)
    return randomize_parameters(model, scale=0.2, seed=seed)


def config_of(model: torch.nn.Module) -> dict:
    config = dict(model.config.to_dict(), architectures=[type(model).__name__])  # as save_pretrained writes
    if isinstance(model, transformers.ViTModel):
        config["add_pooling_layer"] = model.pooler is not None
    return config


def deploy(model: torch.nn.Module, key: DeveloperKey | None = None) -> tuple:
    """P1 transforms, P2 loads θ′ into the stock class (its embedding module NaN, so any use shows)."""
    config = config_of(model)
    family = detect_family(config)
    key = key or draw_key(family.dims(config))
    cloud, user = transform_state_dict(family, checkpoint_state(model), key, config)
    cloud_model = family.build_cloud_model(config).eval()
    missing, unexpected = cloud_model.load_state_dict(family.module_state(cloud, config), strict=False)
    assert unexpected == []
    assert sorted(n.removeprefix("vit.") for n in missing) == sorted(EMBEDDING_NAMES)
    with torch.no_grad():
        for n in missing:
            cloud_model.get_parameter(n).fill_(float("nan"))
    return family, config, key, cloud_model, user


def images(n: int, model: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    c, size = model.config.num_channels, model.config.image_size
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def through_protocol(deployed: tuple, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    family, config, key, cloud_model, user = deployed
    x = family.embed_images(user, config, pixels)  # P3: (B, 1 + N, d), pixels stay here
    out = family.cloud_forward(cloud_model, permute(x, key.pi), None)  # P2 on x·π
    if family.is_encoder:
        pooled = unpermute(out.pooled, key.pi) if out.pooled is not None else None
        return unpermute(out.output, key.pi), pooled
    assert out.output.shape == (pixels.shape[0], 1, key.dims.d_out)
    return unpermute(out.output[:, 0], key.pi_c), None


@pytest.mark.parametrize(
    "kw",
    [{}, {"qkv_bias": False, "num_labels": 3}, {"num_channels": 1, "patch_size": 8, "num_attention_heads": 2}],
    ids=["base", "no-qkv-bias", "grey-big-patches"],
)
def test_classifier_matches_stock_class(kw: dict) -> None:
    model = tiny_vit(**kw)
    pixels = images(3, model)
    with torch.no_grad():
        ref = model(pixel_values=pixels).logits
    got, _ = through_protocol(deploy(model), pixels)
    assert_close(ref, got)
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("pool", [True, False])
def test_vit_model_matches_stock_class(pool: bool) -> None:
    model = tiny_vit(transformers.ViTModel, pool=pool, num_hidden_layers=3)
    pixels = images(2, model)
    with torch.no_grad():
        ref = model(pixel_values=pixels)
    hidden, pooled = through_protocol(deploy(model), pixels)
    assert_close(ref.last_hidden_state, hidden)
    if pool:
        assert pooled is not None and max_abs_diff(ref.pooler_output, pooled) <= 1e-4
        assert float(ref.pooler_output.abs().max()) > 0.1
    else:
        assert pooled is None


def test_embed_images_is_vit_embeddings() -> None:
    model = tiny_vit()
    _, config, _, _, user = deploy(model)
    pixels = images(2, model)
    with torch.no_grad():
        ref = model.vit.embeddings(pixels)
    assert max_abs_diff(ref, CLASSIFIER.embed_images(user, config, pixels)) <= 1e-6  # type: ignore[attr-defined]
    with pytest.raises(BadTensor, match=r"\(B, 3, 16, 16\)"):
        CLASSIFIER.embed_images(user, config, pixels[:, :, :8])  # type: ignore[attr-defined]
    with pytest.raises(BadTensor, match="images"):
        CLASSIFIER.embed(user, config, torch.zeros(1, 3, dtype=torch.long))


# --- what P2 holds ------------------------------------------------------------------------------


def test_cloud_holds_no_embedding_and_no_label_names() -> None:
    model = tiny_vit(id2label={i: f"secret-{i}" for i in range(7)}, label2id={f"secret-{i}": i for i in range(7)})
    config = config_of(model)
    key = draw_key(CLASSIFIER.dims(config))
    state = checkpoint_state(model)
    cloud, user = transform_state_dict(CLASSIFIER, state, key, config)
    assert set(user) == set(EMBEDDING_NAMES)
    assert all(torch.equal(user[n], state["vit." + n]) for n in EMBEDDING_NAMES)
    assert not any("embeddings" in n for n in cloud)
    assert torch.equal(cloud[CLASSIFIER_W], state[CLASSIFIER_W][key.pi_c][:, key.pi])  # πᵀ W_c π_c
    cloud_config = CLASSIFIER.cloud_config(config)
    assert "secret" not in str(cloud_config) and cloud_config["num_labels"] == 7
    assert key.dims.d_out == key.pi_c.numel() == 7  # π_c permutes the classes


_QK = {"attention.attention." + n for n in ("query.weight", "query.bias", "key.weight", "key.bias")}
_V = {"attention.attention.value.weight", "attention.attention.value.bias", "attention.output.dense.weight"}
MOVES = Moves(  # which cloud tensors each permutation must change
    inner=("query.bias", "key.bias", "value.bias", "intermediate.dense.bias", "classifier.bias"),
    head=frozenset({"classifier.weight", "classifier.bias"}),
    depth=4,  # vit.encoder.layer.{i}.
    layer={
        "head": _QK | _V,
        "qk": _QK,
        "v": _V,
        "ffn": {"intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight"},
    },
)


@pytest.mark.parametrize("part", ["pi", "pi_c", *MOVES.layer])
def test_each_permutation_changes_the_cloud_weights(part: str) -> None:
    model = tiny_vit()
    assert_each_permutation_moves(CLASSIFIER, checkpoint_state(model), config_of(model), part, MOVES)


# --- θ′ on disk loads into the stock class as transformers loads it -----------------------------


@pytest.mark.parametrize("cls", [transformers.ViTForImageClassification, transformers.ViTModel])
def test_cloud_dir_loads_with_from_pretrained_as_on_p2(cls: type, tmp_path: Path) -> None:
    model = tiny_vit(cls)
    model.config.architectures = [cls.__name__]
    model.save_pretrained(tmp_path / "model")
    result = transform_model_dir(tmp_path / "model", tmp_path / "out", progress=False)
    assert result.family == ("vit" if cls is transformers.ViTForImageClassification else "vit_model")
    cloud_config = transformers.AutoConfig.from_pretrained(tmp_path / "out" / "cloud").to_dict()
    on_p2 = load_cloud_model(cloud_config, result.cloud_files).model
    stock = cls.from_pretrained(tmp_path / "out" / "cloud")
    theirs = dict(stock.named_parameters())
    ours = {n: p for n, p in on_p2.named_parameters() if "embeddings." not in n}  # P2's are empty placeholders
    assert set(ours) == {n for n in theirs if "embeddings." not in n}
    for n, p in ours.items():
        assert torch.equal(p, theirs[n]), n
    assert not (tmp_path / "out" / "user" / "model.safetensors").exists()


# --- detection and bad checkpoints --------------------------------------------------------------


def test_detection() -> None:
    config = config_of(tiny_vit())
    assert detect_family(config) is CLASSIFIER
    assert detect_family(dict(config, architectures=["ViTModel"])) is ENCODER
    assert detect_family({k: v for k, v in config.items() if k != "architectures"}) is ENCODER  # bare model_type
    assert ENCODER.dims(dict(config, architectures=["ViTModel"])).encoder


def test_bad_checkpoints_are_refused_by_name() -> None:
    model = tiny_vit()
    config = config_of(model)
    key = draw_key(CLASSIFIER.dims(config))
    state = checkpoint_state(model)
    q = "vit.encoder.layer.1.attention.attention.query.weight"
    with pytest.raises(CheckpointError, match="query"):
        transform_state_dict(CLASSIFIER, dict(state, **{q: state[q][:-1]}), key, config)
    with pytest.raises(CheckpointError, match="position_embeddings"):
        CLASSIFIER.transform("vit.embeddings.position_embeddings", torch.zeros(1, 5, 32), key, config)
    unexpected = (
        "vit.layers.0.attention.q_proj.weight",
        "vit.encoder.layer.2.output.dense.bias",
        "pooler.dense.weight",
    )
    assert_refused_by_name(CLASSIFIER, state, key, config, unexpected=unexpected, embedding="cls_token")
