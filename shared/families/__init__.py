"""The supported model families and their detection from config.json."""

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
    """The family serving this config.json, by its `architectures` then its `model_type`."""
    archs = config.get("architectures") or []
    for family in FAMILIES.values():
        if any(a in family.architectures for a in archs):
            return family
    for family in FAMILIES.values():
        if config.get("model_type") in family.model_types:
            return family
    supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise UnsupportedModel(
        f"unsupported architecture {archs or config.get('model_type')!r}; supported: {', '.join(supported)}"
    )


__all__ = ["FAMILIES", "CloudOutput", "Config", "Family", "Piece", "detect_family", "get_family"]
