"""The STIP protocol core: keys, per-family weight transforms, checkpoint I/O, wire format.

Pure: nothing here imports an HTTP library. Services and the SDK build on it.
"""

from typing import TYPE_CHECKING

from shared.errors import (
    BadTensor,
    CheckpointError,
    CredentialError,
    StipCoreError,
    UnsupportedModel,
)
from shared.lazy import lazy_attributes

if TYPE_CHECKING:
    from shared.keys import DeveloperKey, LayerKey, UserKey, draw_key

# shared.keys needs torch: imported on first use, so `shared.errors` stays light.
__getattr__ = lazy_attributes(
    __name__, dict.fromkeys(["DeveloperKey", "LayerKey", "UserKey", "draw_key"], "shared.keys")
)

__all__ = [
    "BadTensor",
    "CheckpointError",
    "CredentialError",
    "DeveloperKey",
    "LayerKey",
    "StipCoreError",
    "UnsupportedModel",
    "UserKey",
    "draw_key",
]
