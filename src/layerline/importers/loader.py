"""``load_model``: any supported model file -> ``onnx.ModelProto``."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from layerline.errors import ModelImportError
from layerline.importers.keras_export import KERAS_SUFFIXES, from_keras

__all__ = ["SUPPORTED_SUFFIXES", "load_model"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".onnx", *KERAS_SUFFIXES)
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pt2")
_TORCH_HINT = (
    "PyTorch files hold weights (or a pickled module), not a graph layerline can read; load the module in "
    "Python and convert it with layerline.importers.from_torch(module, example_inputs, path='model.onnx')"
)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load ``path`` as ONNX: ``.onnx`` directly (external data included), ``.keras``/``.h5`` through
    :func:`~layerline.importers.from_keras`. Anything else raises ModelImportError saying what to do."""
    path = Path(path)
    suffix = path.suffix.lower()
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if not path.exists():
        raise ModelImportError(f"{path}: no such file (layerline reads {supported} model files)")
    if path.is_dir():
        raise ModelImportError(
            f"{path} is a directory; layerline reads single model files ({supported}). A TensorFlow "
            "SavedModel must be converted first (e.g. with tf2onnx)"
        )
    if suffix == ".onnx":
        try:
            return onnx.load(str(path), load_external_data=True)
        except Exception as exc:
            raise ModelImportError(
                f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); if its weights live in an "
                "external data file, keep that file beside it under the name the model records"
            ) from exc
    if suffix in KERAS_SUFFIXES:
        return from_keras(path)
    if suffix in _TORCH_SUFFIXES:
        raise ModelImportError(f"{path}: {_TORCH_HINT}")
    raise ModelImportError(
        f"{path}: unknown model format {suffix or '(no suffix)'!r}; supported files are {supported}. For a "
        "PyTorch module use layerline.importers.from_torch(module, example_inputs)"
    )
