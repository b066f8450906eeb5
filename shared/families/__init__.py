"""The supported model families and their detection from config.json."""

from shared.errors import UnsupportedModel
from shared.families.base import CloudOutput, Config, Family, Piece
from shared.families.bert import BertFamily
from shared.families.gpt2 import GPT2Family
from shared.families.llama import LlamaFamily
from shared.families.paper import PaperFamily

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2Family(), LlamaFamily(), BertFamily(), PaperFamily())}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModel(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}") from None


def detect_family(config: Config) -> Family:
    """The family serving this config.json, named by its `architectures` and its `model_type`.

    Both must name the same family: the family (and with it which tensors count as the
    embedding module, which P2 must never hold) is read from `architectures`, but the stock
    class is built from `model_type`, so a config naming one family in each could carry an
    embedding table past the checks. A config without `architectures` is served by its
    `model_type` alone.
    """
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = []
    model_type = config.get("model_type")
    by_arch = {f.name: f for f in FAMILIES.values() for a in archs if a in f.architectures}
    by_type = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if not by_arch and by_type is None:
        supported = sorted(a for f in FAMILIES.values() for a in f.architectures)
        raise UnsupportedModel(f"unsupported architecture {archs or model_type!r}; supported: {', '.join(supported)}")
    if by_arch and (by_type is None or set(by_arch) != {by_type.name}):
        named = f"model_type {model_type!r}" + (f" (the {by_type.name} family)" if by_type else "")
        raise UnsupportedModel(
            f"config.json's architectures {archs} ({' and '.join(sorted(by_arch))}) and its {named} must "
            f"name the same model family: fix config.json so that both describe the checkpoint"
        )
    return by_type if by_type is not None else next(iter(by_arch.values()))


__all__ = ["FAMILIES", "CloudOutput", "Config", "Family", "Piece", "detect_family", "get_family"]
