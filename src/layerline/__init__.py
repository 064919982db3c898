"""layerline: cut a trained network into stages, place them on devices, serve predictions.

The importers are loaded on first use, so ``import layerline`` stays light (no torch, no keras).
"""

from __future__ import annotations

from typing import Any

from layerline.errors import LayerlineError

__version__ = "0.1.0"

__all__ = ["LayerlineError", "__version__", "from_keras", "from_torch", "load_model", "slice_model"]

_LAZY = {
    "from_torch": "layerline.importers",
    "from_keras": "layerline.importers",
    "load_model": "layerline.importers",
    "slice_model": "layerline.graph",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'layerline' has no attribute {name!r}")
