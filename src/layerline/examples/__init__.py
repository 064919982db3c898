"""Example models built directly as ONNX with seeded random weights (numpy + onnx only, no torch).

``EXAMPLES`` names them (``vgg16``, ``resnet18``, ``transformer`` and their ``-tiny`` variants);
``build_example(name, path, **size)`` saves one. ``keras_cnn(path)`` (needs keras) saves a small Keras
model for the importers.
"""

from __future__ import annotations

from layerline.examples._builder import param_count
from layerline.examples.cnn import resnet18, vgg16
from layerline.examples.keras_cnn import keras_cnn
from layerline.examples.registry import EXAMPLES, ExampleInfo, build_example, get_example
from layerline.examples.transformer import transformer

__all__ = [
    "EXAMPLES",
    "ExampleInfo",
    "build_example",
    "get_example",
    "keras_cnn",
    "param_count",
    "resnet18",
    "transformer",
    "vgg16",
]
