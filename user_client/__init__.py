"""STIP user side (P3): the Python SDK and the `stip` command line.

    from user_client import StipClient

    with StipClient("https://developer.example", deployment_id="dep-1", credential=token) as c:
        c.generate("Once upon a time", max_new_tokens=32)
        c.embed(["a sentence", "another"])
        c.classify(["cat.jpg"])           # ViT: [[Classification(label, score, class_id), ...]]

The client fetches and caches the user bundle from P1 (π, π_c, the embedding module, the
tokenizer), embeds and permutes locally, sends only x·π to P2, un-permutes what comes back and
samples locally.
"""

from typing import TYPE_CHECKING

from shared.lazy import lazy_attributes
from user_client import errors as _errors
from user_client.errors import *  # noqa: F403 (the exception tree: plain classes, no torch)

if TYPE_CHECKING:
    from user_client.bundle import Bundle, BundleCache
    from user_client.client import Session, Step, StipClient, TopK
    from user_client.images import Classification, ImageEmbedding
    from user_client.sampling import SamplingParams
    from user_client.settings import ClientSettings

# Imported on first use (the SDK needs torch and transformers), so `stip --help` stays fast.
__getattr__ = lazy_attributes(
    __name__,
    {
        **dict.fromkeys(["Bundle", "BundleCache"], "user_client.bundle"),
        **dict.fromkeys(["Session", "Step", "StipClient", "TopK"], "user_client.client"),
        **dict.fromkeys(["Classification", "ImageEmbedding"], "user_client.images"),
        "SamplingParams": "user_client.sampling",
        "ClientSettings": "user_client.settings",
    },
)

__all__ = [
    "Bundle",
    "BundleCache",
    "Classification",
    "ClientSettings",
    "ImageEmbedding",
    "SamplingParams",
    "Session",
    "Step",
    "StipClient",
    "TopK",
]
__all__ += _errors.__all__
