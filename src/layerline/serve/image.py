"""Image files to input tensors for image classifiers, and the top-k classes of their output.

Decoding and resizing an image needs Pillow (``pip install pillow``), which layerline does not require;
everything after decoding (layout, scaling, normalisation) is plain numpy in :func:`image_to_tensor`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from layerline.errors import BadRequest, LayerlineError
from layerline.serve.validation import format_shape
from layerline.tensors import TensorSpec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Scaling",
    "image_layout",
    "image_to_tensor",
    "load_image",
    "pillow_available",
    "softmax",
    "top_k",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``"imagenet"``: /255 then (x - mean) / std per channel; ``"unit"``: /255 to [0, 1]; ``"raw"``: 0..255.
Scaling = Literal["imagenet", "unit", "raw"]


def pillow_available() -> bool:
    """Whether Pillow can be imported."""
    return importlib.util.find_spec("PIL") is not None


def image_layout(spec: TensorSpec) -> tuple[str, int, int | str, int | str]:
    """``("NCHW" | "NHWC", channels, height, width)`` of an image input; BadRequest if it is not one.

    A rank-4 input whose dimension 1 is 1 or 3 is NCHW; otherwise one whose last dimension is 1 or 3 is NHWC.
    """
    shape = spec.shape
    if len(shape) == 4:
        if shape[1] in (1, 3):
            return "NCHW", int(shape[1]), shape[2], shape[3]
        if shape[3] in (1, 3):
            return "NHWC", int(shape[3]), shape[1], shape[2]
    raise BadRequest(
        f"input '{spec.name}' with shape {format_shape(shape)} is not an image input "
        "([batch, 3, H, W] or [batch, H, W, 3]); pass a .npy array instead"
    )


def image_to_tensor(pixels: np.ndarray, spec: TensorSpec, scaling: Scaling = "imagenet") -> np.ndarray:
    """A batch of one from ``pixels`` (H x W x C uint8, C = the input's channels), laid out for ``spec``."""
    if scaling not in ("imagenet", "unit", "raw"):
        raise ValueError(f"scaling must be 'imagenet', 'unit' or 'raw', got {scaling!r}")
    layout, channels, _, _ = image_layout(spec)
    if pixels.ndim != 3 or pixels.shape[2] != channels:
        raise BadRequest(f"expected H x W x {channels} pixels, got an array of shape {list(pixels.shape)}")
    x = pixels.astype(np.float32)
    if scaling in ("imagenet", "unit"):
        x /= 255.0
    if scaling == "imagenet":
        mean = np.asarray(IMAGENET_MEAN if channels == 3 else (np.mean(IMAGENET_MEAN),), np.float32)
        std = np.asarray(IMAGENET_STD if channels == 3 else (np.mean(IMAGENET_STD),), np.float32)
        x = (x - mean) / std
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[np.newaxis], dtype=spec.numpy_dtype)


def load_image(
    path: str | Path,
    spec: TensorSpec,
    scaling: Scaling = "imagenet",
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a jpg/png (or any format Pillow reads) as a batch-of-one input tensor for ``spec``.

    The image is converted to RGB (or grayscale for one-channel inputs) and resized to the input's fixed
    height and width, or to ``size`` (H, W) when given; dynamic dims without ``size`` keep the image's size.
    """
    if not pillow_available():
        raise LayerlineError(
            f"reading the image {path} needs Pillow, which is not installed: `pip install pillow`, "
            "or pass the input as a .npy file"
        )
    from PIL import Image, UnidentifiedImageError

    _, channels, height, width = image_layout(spec)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if size is not None:
                target = (size[1], size[0])
            else:
                target = (
                    width if isinstance(width, int) else img.width,
                    height if isinstance(height, int) else img.height,
                )
            if img.size != target:
                img = img.resize(target, Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise BadRequest(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BadRequest(f"cannot read {path} as an image: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return image_to_tensor(pixels, spec, scaling)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


@overload
def top_k(logits: Sequence[float], k: int = 5, apply_softmax: bool = True) -> list[tuple[int, float]]: ...
@overload
def top_k(logits: np.ndarray, k: int = 5, apply_softmax: bool = True) -> list: ...
def top_k(logits: Any, k: int = 5, apply_softmax: bool = True) -> list:
    """The ``k`` most likely classes, best first, as ``(class, probability)`` pairs.

    One row of scores (shape ``(classes,)``) gives one list of pairs; a batch (``(batch, classes)``) gives
    a list of such lists, one per row. Pass ``apply_softmax=False`` when the model already ends in a
    softmax, so that its probabilities are reported as they are.
    """
    x = np.asarray(logits)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"top_k needs (classes,) or (batch, classes) scores, got shape {list(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = x[np.newaxis] if x.ndim == 1 else x
    probs = softmax(rows) if apply_softmax else rows.astype(np.float64)
    k = min(k, rows.shape[1])
    result: list[list[tuple[int, float]]] = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        result.append([(int(i), float(row[i])) for i in order])
    return result[0] if x.ndim == 1 else result
