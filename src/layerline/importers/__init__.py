"""Bring models into layerline as ONNX: PyTorch modules, Keras 3 files, ONNX files.

torch and keras are optional (``pip install 'layerline[torch]'`` / ``'layerline[keras]'``); they are
imported only when a converter that needs them is called.
"""

from __future__ import annotations

from layerline.importers._onnxio import save_model
from layerline.importers.keras_export import from_keras, import_keras
from layerline.importers.loader import SUPPORTED_SUFFIXES, load_model
from layerline.importers.torch_export import from_torch, import_torch

__all__ = [
    "SUPPORTED_SUFFIXES",
    "from_keras",
    "from_torch",
    "import_keras",
    "import_torch",
    "load_model",
    "save_model",
]
