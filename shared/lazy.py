"""Lazy package attributes (PEP 562), so that importing a light module of a package does not
import torch through the package's `__init__`.

    __getattr__ = lazy_attributes(__name__, {"StipClient": "user_client.client", ...})

Command lines depend on this: `stip --help` must not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `names[attr]` on first access of `attr`."""

    def __getattr__(attr: str) -> object:
        module = names.get(attr)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        return getattr(importlib.import_module(module), attr)

    return __getattr__
