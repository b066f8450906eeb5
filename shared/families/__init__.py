"""The supported model families and their detection from config.json."""

import functools

from shared.errors import UnsupportedModel
from shared.families.base import CloudOutput, Config, Family, Piece
from shared.families.bert import BertFamily
from shared.families.gpt2 import GPT2Family
from shared.families.llama import LlamaFamily
from shared.families.moe import MixtralFamily, Qwen2MoeFamily
from shared.families.paper import PaperFamily
from shared.families.vit import ViTClassifierFamily, ViTEncoderFamily

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        GPT2Family(),
        LlamaFamily(),
        MixtralFamily(),
        Qwen2MoeFamily(),
        BertFamily(),
        ViTClassifierFamily(),
        ViTEncoderFamily(),
        PaperFamily(),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModel(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}") from None


def detect_family(config: Config) -> Family:
    """The family serving this config.json, named by its `architectures` and its `model_type`.

    The two must agree: the family (and with it which tensors count as the embedding module,
    which P2 must never hold) is read from `architectures`, but the stock class is built from
    `model_type`, so a config naming another model in each could carry an embedding table past
    the checks. They agree when `model_type` is one of the family's, or when transformers itself
    registers each named class for that `model_type`. A config without `architectures` is served
    by its `model_type` alone.
    """
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = []
    model_type = config.get("model_type")
    named = {f.name: f for f in FAMILIES.values() for a in archs if a in f.architectures}
    by_type = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if not named:
        if by_type is None:
            supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
            raise UnsupportedModel(
                f"unsupported architecture {archs or model_type!r}; supported: {', '.join(supported)}"
            )
        return by_type
    served = [a for a in archs if isinstance(a, str) and any(a in f.architectures for f in named.values())]
    (family,) = named.values() if len(named) == 1 else (None,)
    if family is None or not (
        model_type in family.model_types or (isinstance(model_type, str) and set(served) <= _stock_classes(model_type))
    ):
        raise UnsupportedModel(
            f"config.json's architectures {served} and its model_type {model_type!r} do not name the same "
            "model family: fix config.json so that both describe the checkpoint"
        )
    return family


@functools.cache
def _stock_classes(model_type: str) -> frozenset[str]:
    """The class names transformers' auto mappings register for `model_type`."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if attr.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            found = mapping.get(model_type) or ()
            names.update([found] if isinstance(found, str) else found)
    return frozenset(names)


__all__ = ["FAMILIES", "CloudOutput", "Config", "Family", "Piece", "detect_family", "get_family"]
