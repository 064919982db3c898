"""layerline: cut a trained network into stages, place them on devices, serve predictions."""

from __future__ import annotations

from layerline.errors import LayerlineError

__version__ = "0.1.0"

__all__ = ["LayerlineError", "__version__"]
