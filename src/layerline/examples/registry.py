"""The named example models: what they are, how to build them and how to feed them."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx

from layerline.errors import LayerlineError
from layerline.examples.cnn import image_inputs, resnet18, vgg16
from layerline.examples.transformer import token_inputs, transformer
from layerline.importers._onnxio import save_model

__all__ = ["EXAMPLES", "ExampleInfo", "build_example", "get_example"]


@dataclass(frozen=True)
class ExampleInfo:
    """One named example: ``builder(**size)`` returns the ONNX model, ``sample_inputs`` valid inputs.

    ``defaults`` are the size arguments this entry passes to its builder (e.g. the tiny variants' widths);
    any of them can be overridden per call.
    """

    name: str
    description: str
    builder: Callable[..., onnx.ModelProto]
    inputs: Callable[..., dict[str, np.ndarray]]
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def size(self, **overrides: Any) -> dict[str, Any]:
        """The builder's size arguments: ``defaults`` updated with ``overrides`` (checked by name)."""
        accepted = set(inspect.signature(self.builder).parameters)
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise LayerlineError(
                f"example {self.name!r} has no size argument {', '.join(unknown)}; "
                f"it accepts {', '.join(sorted(accepted))}"
            )
        return {**self.defaults, **overrides}

    def build(self, **size: Any) -> onnx.ModelProto:
        """The model, with random weights (seeded: the same arguments give the same bytes)."""
        try:
            return self.builder(**self.size(**size))
        except ValueError as exc:
            raise LayerlineError(f"example {self.name!r}: {exc}") from exc

    def sample_inputs(
        self, batch: int = 1, rng: np.random.Generator | None = None, **size: Any
    ) -> dict[str, np.ndarray]:
        """Valid inputs for ``batch`` rows, for the model built with the same ``size`` arguments.

        Inputs-only options (the transformer's ``seq``) may be passed along with size arguments.
        """
        if batch < 1:
            raise LayerlineError(f"batch must be >= 1, got {batch}")
        rng = np.random.default_rng(0) if rng is None else rng
        return self.inputs(batch, rng, **{**self.defaults, **size})


_VGG16 = "VGG16 image classifier (13 conv + 3 FC, 138 M parameters at full size)"
_RESNET = "ResNet-18 image classifier (residual blocks with BatchNormalization, 11.7 M parameters)"
_TRANSFORMER = "BERT-base style transformer encoder (token ids + attention mask -> hidden states, 110 M)"

EXAMPLES: Mapping[str, ExampleInfo] = MappingProxyType(
    {
        info.name: info
        for info in (
            ExampleInfo("vgg16", _VGG16, vgg16, image_inputs),
            ExampleInfo("resnet18", _RESNET, resnet18, image_inputs),
            ExampleInfo("transformer", _TRANSFORMER, transformer, token_inputs),
            ExampleInfo(
                "vgg16-tiny",
                "VGG16 at 1/8 width on 32x32 images (1 M parameters), for demos and tests",
                vgg16,
                image_inputs,
                MappingProxyType({"width": 0.125, "image_size": 32}),
            ),
            ExampleInfo(
                "resnet18-tiny",
                "ResNet-18 at 1/8 width on 32x32 images (0.24 M parameters), for demos and tests",
                resnet18,
                image_inputs,
                MappingProxyType({"width": 0.125, "image_size": 32}),
            ),
            ExampleInfo(
                "transformer-tiny",
                "2-layer transformer encoder, d_model 64, 4 heads, vocabulary 1000, for demos and tests",
                transformer,
                token_inputs,
                MappingProxyType({"layers": 2, "d_model": 64, "heads": 4, "vocab": 1000, "max_seq": 64}),
            ),
        )
    }
)


def get_example(name: str) -> ExampleInfo:
    """The registry entry called ``name``."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise LayerlineError(
            f"no example model called {name!r}; choose one of {', '.join(EXAMPLES)}"
        ) from None


def build_example(name: str, path: str | os.PathLike[str], **size: Any) -> Path:
    """Build example ``name`` and save it as ONNX at ``path``: a file, or a directory (an existing one, or a
    new path without a suffix) to put ``<name>.onnx`` in. Weights go to an external data file if the model
    exceeds 2 GB. Returns the file written."""
    info = get_example(name)
    target = Path(path)
    if target.is_dir() or (not target.suffix and not target.exists()):
        target = target / f"{name}.onnx"
    return save_model(info.build(**size), target)
