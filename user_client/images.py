"""Images on the user side (P3): loading, the image processor's preprocessing, class scores.

The pixels never leave P3: the bundle's image processor (`preprocessor_config.json`, run with
transformers' PIL backend, so without torchvision) turns images into pixel values, the ViT
family's embedding module turns those into x (B, 1 + N, d), and only x·π goes to P2. Label
names (`id2label`) come from the bundle's config.json; P2 only knows how many classes there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from user_client.bundle import Bundle
from user_client.errors import BundleError

if TYPE_CHECKING:
    from user_client.client import StipClient

PREPROCESSOR_FILE = "preprocessor_config.json"
ImageInput = Any  # a path, a PIL image, a numpy array (H, W, C) or a tensor (C, H, W)
Images = ImageInput | Sequence[ImageInput]


class Classification(NamedTuple):
    """One class of one image: its name (from the bundle's id2label), its score and its id."""

    label: str
    score: float
    class_id: int


class ImageEmbedding(NamedTuple):
    """A ViTModel's plaintext outputs: (n, 1 + N, d) hidden states and the (n, d) pooled output."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None


def as_list(images: Images) -> list[ImageInput]:
    if isinstance(images, str | Path) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def load_image(image: ImageInput) -> Any:
    """A path becomes an RGB PIL image; anything else goes to the image processor as is."""
    if not isinstance(image, str | Path):
        return image
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read the image {str(image)!r}: {e}") from None


@lru_cache(maxsize=8)
def _processor(path: str) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    except Exception as e:
        raise BundleError(f"cannot load the bundle's image processor: {type(e).__name__}: {e}") from None


def pixel_values(bundle: Bundle, images: Sequence[ImageInput]) -> torch.Tensor:
    """The image processor's preprocessing, here on P3: images -> (n, C, H, W) float32."""
    if not (bundle.path / PREPROCESSOR_FILE).is_file():
        raise BundleError(
            f"the bundle has no {PREPROCESSOR_FILE}: put the image processor's config into the model "
            "directory P1 registered (ViTImageProcessor.save_pretrained) and rotate the deployment"
        )
    processor = _processor(str(bundle.path))
    out = processor(images=[load_image(i) for i in images], return_tensors="pt")
    return out["pixel_values"].float()


def scores(bundle: Bundle, logits: torch.Tensor) -> torch.Tensor:
    """Class scores as transformers' image-classification pipeline gives them: sigmoid for
    multi-label models (or a single logit), softmax otherwise. logits (n, C) -> (n, C)."""
    multi = bundle.config.get("problem_type") == "multi_label_classification" or logits.shape[-1] == 1
    return logits.sigmoid() if multi else logits.softmax(-1)


def top_classes(bundle: Bundle, logits: torch.Tensor, top_k: int | None) -> list[list[Classification]]:
    """Per image, the `top_k` best classes (all with None), best first, named by id2label."""
    names = bundle.config.get("id2label") or {}
    s = scores(bundle, logits.float())
    k = s.shape[-1] if top_k is None else min(top_k, s.shape[-1])
    values, indices = torch.topk(s, k, dim=-1)
    return [
        [Classification(str(names.get(str(i), f"LABEL_{i}")), float(v), i) for v, i in zip(vs, idx, strict=True)]
        for vs, idx in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def classify_command(client: StipClient, paths: Sequence[str], *, top_k: int, batch_size: int) -> None:
    """`stip classify IMAGE...`: one JSON line per image, `{"image", "classes": [{label, score, class_id}]}`."""
    import json
    import sys

    with client:
        results = client.classify(list(paths), top_k=top_k, batch_size=batch_size)
    for path, classes in zip(paths, results, strict=True):
        sys.stdout.write(json.dumps({"image": path, "classes": [c._asdict() for c in classes]}) + "\n")
