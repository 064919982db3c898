"""Convolutional example models: VGG16 and ResNet-18, built directly as ONNX with random weights."""

from __future__ import annotations

import numpy as np
import onnx

from layerline.examples._builder import GraphBuilder, float_input
from layerline.examples._moments import Moments

__all__ = ["image_inputs", "resnet18", "vgg16"]

_VGG16_CONFIG: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_RESNET18_STAGES: tuple[int, ...] = (64, 128, 256, 512)
#: Standard deviation of the random logits (a trained classifier's are a few units apart).
_LOGIT_STD = 2.0
#: Variance left after GlobalAveragePool, relative to one position's (measured, see resnet18).
_GAP_VARIANCE = 0.75


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _check_image_size(image_size: int, model: str) -> None:
    if image_size < 32 or image_size % 32:
        raise ValueError(
            f"{model}: image_size must be a multiple of 32 and at least 32 (five 2x downsamplings), "
            f"got {image_size}; use e.g. 32, 64 or 224"
        )


def _check_width(width: float, model: str) -> None:
    if not width > 0:
        raise ValueError(f"{model}: width must be > 0 (1.0 is the real network), got {width}")


def vgg16(
    width: float = 1.0, image_size: int = 224, num_classes: int = 1000, seed: int = 0
) -> onnx.ModelProto:
    """VGG16: 13 conv3x3+ReLU in five blocks each ending in MaxPool, then FC 4096-4096-``num_classes``.

    Input ``input`` ``[batch, 3, image_size, image_size]``, output ``logits`` ``[batch, num_classes]``.
    ``width`` scales every channel count and the FC width (1.0 gives the real 138 M parameters).
    """
    _check_width(width, "vgg16")
    _check_image_size(image_size, "vgg16")
    g = GraphBuilder(seed)
    x, c_in, m = "input", 3, Moments(0.0, 1.0)
    for b, (channels, convs) in enumerate(_VGG16_CONFIG, start=1):
        c_out = _scaled(channels, width)
        for i in range(1, convs + 1):
            x = g.conv(x, c_in, c_out, 3, f"block{b}/conv{i}", m)
            x = g.node("Relu", [x], f"block{b}/relu{i}")
            c_in, m = c_out, Moments(0.0, 1.0).relu()
        x = g.node("MaxPool", [x], f"block{b}/pool", kernel_shape=[2, 2], strides=[2, 2])
        m = Moments(0.0, 1.0).max_of(4).relu()
    x = g.node("Flatten", [x], "flatten", axis=1)
    side = image_size // 32
    d_in, hidden = c_in * side * side, _scaled(4096, width)
    x = g.node("Relu", [g.gemm(x, d_in, hidden, "fc1", m)], "fc1/relu")
    x = g.node("Relu", [g.gemm(x, hidden, hidden, "fc2", Moments(0.0, 1.0).relu())], "fc2/relu")
    logits = g.gemm(x, hidden, num_classes, "fc3", Moments(0.0, 1.0).relu(), gain=_LOGIT_STD)
    g.rename_output(logits, "logits")
    return g.model(
        "vgg16",
        [float_input("input", ["batch", 3, image_size, image_size])],
        [float_input("logits", ["batch", num_classes])],
        doc=f"VGG16 (width={width}, image_size={image_size}) with random weights, built by layerline",
        metadata={"layerline.example": "vgg16", "width": str(width), "image_size": str(image_size)},
    )


def _basic_block(
    g: GraphBuilder, x: str, m: Moments, c_in: int, c_out: int, stride: int, name: str
) -> tuple[str, Moments]:
    y = g.conv_bn(x, c_in, c_out, 3, f"{name}/1", m, stride=stride)
    y = g.node("Relu", [y], f"{name}/relu1")
    # The last BN of a residual branch starts small (as "zero-init residual" training does), so that the
    # variance does not double at every one of the eight additions.
    y = g.conv_bn(y, c_out, c_out, 3, f"{name}/2", Moments(0.0, 1.0).relu(), gamma=(0.45, 0.55))
    shortcut, m_short = x, m
    if stride != 1 or c_in != c_out:
        shortcut = g.conv_bn(x, c_in, c_out, 1, f"{name}/downsample", m, stride=stride)
        m_short = Moments(0.0, 1.0)
    out = g.node("Relu", [g.node("Add", [y, shortcut], f"{name}/add")], f"{name}/relu2")
    return out, (Moments(0.0, 0.25) + m_short).relu()


def resnet18(
    width: float = 1.0, image_size: int = 224, num_classes: int = 1000, seed: int = 0
) -> onnx.ModelProto:
    """ResNet-18: conv7x7/2 + BN + ReLU + MaxPool, four stages of two residual basic blocks, GAP, FC.

    Input ``input`` ``[batch, 3, image_size, image_size]``, output ``logits`` ``[batch, num_classes]``.
    BatchNormalization nodes carry random statistics near an identity. ``width`` scales the channels.
    """
    _check_width(width, "resnet18")
    _check_image_size(image_size, "resnet18")
    g = GraphBuilder(seed)
    c = _scaled(64, width)
    x = g.conv_bn("input", 3, c, 7, "stem", Moments(0.0, 1.0), stride=2)
    x = g.node("Relu", [x], "stem/relu")
    x = g.node("MaxPool", [x], "stem/pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in, m = c, Moments(0.0, 1.0).max_of(9).relu()
    for s, channels in enumerate(_RESNET18_STAGES, start=1):
        c_out = _scaled(channels, width)
        for b in (1, 2):
            stride = 2 if (s > 1 and b == 1) else 1
            x, m = _basic_block(g, x, m, c_in, c_out, stride, f"stage{s}/block{b}")
            c_in = c_out
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    # Averaging over positions keeps the mean and shrinks the variance (by less than the number of
    # positions: neighbours and channels are correlated); 0.75 was measured at 64x64 and 224x224.
    logits = g.gemm(x, c_in, num_classes, "fc", Moments(m.mean, m.var * _GAP_VARIANCE), gain=_LOGIT_STD)
    g.rename_output(logits, "logits")
    return g.model(
        "resnet18",
        [float_input("input", ["batch", 3, image_size, image_size])],
        [float_input("logits", ["batch", num_classes])],
        doc=f"ResNet-18 (width={width}, image_size={image_size}) with random weights, built by layerline",
        metadata={"layerline.example": "resnet18", "width": str(width), "image_size": str(image_size)},
    )


def image_inputs(
    batch: int, rng: np.random.Generator, *, image_size: int = 224, **_size: object
) -> dict[str, np.ndarray]:
    """A normalised random image batch ``{"input": float32 [batch, 3, image_size, image_size]}``."""
    return {"input": rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)}
