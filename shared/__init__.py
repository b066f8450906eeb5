"""The STIP protocol core: keys, per-family weight transforms, checkpoint I/O, wire format.

Pure: nothing here imports an HTTP library. Services and the SDK build on it.
"""

from shared.errors import (
    BadTensor,
    CheckpointError,
    CredentialError,
    StipCoreError,
    UnsupportedModel,
)
from shared.keys import DeveloperKey, LayerKey, UserKey, draw_key

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
