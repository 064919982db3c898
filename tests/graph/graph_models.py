"""Tiny ONNX models built inline for the graph tests (random weights, dynamic batch), and runners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerline.graph import Manifest, stage_forward_names, write_stage_model
from layerline.runtime.inprocess import run_stage
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec

OPSET = 17
IR_VERSION = 8
F = TensorProto.FLOAT


class Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self, seed: int = 0, scale: float = 0.3) -> None:
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, shape: tuple[int, ...], name: str | None = None) -> str:
        name = name or self.name("w")
        arr = (self.rng.standard_normal(shape) * self.scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, arr: np.ndarray, name: str | None = None) -> str:
        name = name or self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: str | None = None, **attrs) -> str:
        outs = [out or self.name(op_type.lower())] + [self.name(op_type.lower()) for _ in range(n_out - 1)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_"), **attrs))
        return outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3) -> str:
        w = self.weight((cout, cin, k, k))
        b = self.weight((cout,))
        return self.op("Conv", [x, w, b], pads=[k // 2] * 4)

    def model(self, inputs, outputs, name: str = "m") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def tensor(name: str, shape, elem=F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def chain_cnn() -> onnx.ModelProto:
    """Conv-Relu-MaxPool x2, Flatten, Gemm: three layer blocks (hand-checked in the tests)."""
    b = Builder(1)
    h = b.op("MaxPool", [b.op("Relu", [b.conv("x", 3, 4)])], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("MaxPool", [b.op("Relu", [b.conv(h, 4, 8)])], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Flatten", [h], axis=1)
    b.op("Gemm", [h, b.weight((10, 32)), b.weight((10,))], out="logits", transB=1)
    return b.model([tensor("x", ["batch", 3, 8, 8])], [tensor("logits", ["batch", 10])], "chain_cnn")


def residual() -> onnx.ModelProto:
    """Three residual blocks: the skip tensor crosses the cuts inside each block."""
    b = Builder(2, scale=0.15)
    h = b.op("Relu", [b.conv("x", 3, 4)])
    for _ in range(3):
        r = b.conv(b.op("Relu", [b.conv(h, 4, 4)]), 4, 4)
        h = b.op("Relu", [b.op("Add", [r, h])])
    b.op("Identity", [h], out="y")
    return b.model([tensor("x", ["batch", 3, 6, 6])], [tensor("y", ["batch", 4, 6, 6])], "residual")


def unet() -> onnx.ModelProto:
    """Encoder/decoder whose first skip spans every layer in between (Resize with constant scales)."""
    b = Builder(3)
    e1 = b.op("Relu", [b.conv("x", 2, 4)], out="e1")
    e2 = b.op("Relu", [b.conv(b.op("MaxPool", [e1], kernel_shape=[2, 2], strides=[2, 2]), 4, 8)], out="e2")
    m = b.op("Relu", [b.conv(b.op("MaxPool", [e2], kernel_shape=[2, 2], strides=[2, 2]), 8, 8)])
    scales = b.const(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    u2 = b.op("Resize", [m, "", scales], mode="nearest")
    d2 = b.op("Relu", [b.conv(b.op("Concat", [u2, e2], axis=1), 16, 8)])
    u1 = b.op("ConvTranspose", [d2, b.weight((8, 4, 2, 2))], kernel_shape=[2, 2], strides=[2, 2])
    b.conv(b.op("Concat", [u1, e1], axis=1), 8, 1)
    b.nodes[-1].output[0] = "y"
    return b.model([tensor("x", ["batch", 2, 8, 8])], [tensor("y", ["batch", 1, 8, 8])], "unet")


def transformer(layers: int = 2, d: int = 8) -> onnx.ModelProto:
    """Two inputs: tokens (batch, seq, d) and an additive mask (batch, seq, seq) read by every layer."""
    b = Builder(4)
    b.nodes.append(
        helper.make_node(
            "Constant", [], ["scale"], value=numpy_helper.from_array(np.array(d**-0.5, dtype=np.float32))
        )
    )
    h = "x"
    for _ in range(layers):
        q = b.op("MatMul", [h, b.weight((d, d))])
        k = b.op("MatMul", [h, b.weight((d, d))])
        v = b.op("MatMul", [h, b.weight((d, d))])
        s = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
        a = b.op("Softmax", [b.op("Add", [b.op("Mul", [s, "scale"]), "mask"])], axis=-1)
        o = b.op("MatMul", [b.op("MatMul", [a, v]), b.weight((d, d))])
        n1 = b.op("LayerNormalization", [b.op("Add", [h, o]), b.weight((d,)), b.weight((d,))], axis=-1)
        f = b.op("MatMul", [b.op("Relu", [b.op("MatMul", [n1, b.weight((d, 2 * d))])]), b.weight((2 * d, d))])
        h = b.op("Add", [n1, f])
    b.op("ReduceMean", [h], out="pooled", axes=[1], keepdims=0)
    return b.model(
        [tensor("x", ["batch", "seq", d]), tensor("mask", ["batch", "seq", "seq"])],
        [tensor("pooled", ["batch", d])],
        "transformer",
    )


def tied() -> onnx.ModelProto:
    """Four MatMul+Tanh layers; the first and the last share the initializer ``W_tied``."""
    b = Builder(5)
    w = b.weight((6, 6), "W_tied")
    h = b.op("Tanh", [b.op("MatMul", ["x", w])])
    for _ in range(2):
        h = b.op("Tanh", [b.op("MatMul", [h, b.weight((6, 6))])])
    b.op("Tanh", [b.op("MatMul", [h, w])], out="y")
    return b.model([tensor("x", ["batch", 6])], [tensor("y", ["batch", 6])], "tied")


def if_model() -> onnx.ModelProto:
    """A top-level If whose branches read the outer tensor ``h`` and the outer initializer ``Wt``."""
    b = Builder(6)
    h = b.op("MatMul", ["x", b.weight((4, 4))], out="h")
    cond = b.op("Greater", [b.op("ReduceSum", [h], keepdims=0), b.const(np.array(0, dtype=np.float32))])
    wt = b.weight((4, 4), "Wt")
    then_g = helper.make_graph(
        [helper.make_node("MatMul", [h, wt], ["t_out"])], "then", [], [tensor("t_out", ["batch", 4])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", [h], ["e_out"])], "else", [], [tensor("e_out", ["batch", 4])]
    )
    y = b.op("If", [cond], then_branch=then_g, else_branch=else_g)
    b.op("MatMul", [b.op("Relu", [y]), b.weight((4, 3))], out="out")
    return b.model([tensor("x", ["batch", 4])], [tensor("out", ["batch", 3])], "if_model")


def shape_branch() -> onnx.ModelProto:
    """A side branch reads Shape(x) first and feeds the final Reshape: a live int64 [2] at every cut."""
    b = Builder(7)
    n = b.op("Gather", [b.op("Shape", ["x"]), b.const(np.array(0, dtype=np.int64))], axis=0)
    nu = b.op("Unsqueeze", [n, b.const(np.array([0], dtype=np.int64))])
    newshape = b.op("Concat", [nu, b.const(np.array([-1], dtype=np.int64))], out="newshape", axis=0)
    h = b.op("Relu", [b.conv("x", 3, 4)])
    h = b.op("Relu", [b.conv(h, 4, 4)])
    b.op("Reshape", [h, newshape], out="y")
    return b.model([tensor("x", ["batch", 3, 4, 4])], [tensor("y", ["batch", 64])], "shape_branch")


def single_node() -> onnx.ModelProto:
    b = Builder(8)
    b.op("MatMul", ["x", b.weight((3, 3))], out="y")
    return b.model([tensor("x", ["batch", 3])], [tensor("y", ["batch", 3])], "single")


def feeds(model: onnx.ModelProto, batch: int, seed: int = 0, seq: int = 5) -> dict[str, np.ndarray]:
    """Random inputs for ``model`` at ``batch`` (``seq`` for other dynamic dims)."""
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [
            d.dim_value if d.HasField("dim_value") else (batch if i == 0 else seq)
            for i, d in enumerate(vi.type.tensor_type.shape.dim)
        ]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


ALL_MODELS = {
    "chain_cnn": chain_cnn,
    "residual": residual,
    "unet": unet,
    "transformer": transformer,
    "tied": tied,
    "if_model": if_model,
    "shape_branch": shape_branch,
}


def run_partition(
    sliced: Path, manifest: Manifest, parts, inputs: dict[str, np.ndarray], exact: bool, workdir: Path
) -> dict[str, np.ndarray]:
    """Run the stages ``parts`` ((start, stop) ranges, in order) the way the runtime does, with forwarding.

    A one-block range runs the block file itself; a longer one the merged stage file. Checks that every
    stage hands on exactly the tensors of the boundary it ends at.
    """
    tensors = dict(inputs)
    for i, (a, b) in enumerate(parts):
        if b == a + 1:
            path = sliced / manifest.blocks[a].file
        else:
            path = write_stage_model(sliced, a, b, workdir / f"stage_{a}_{b}.onnx")
        spec = StageSpec(i, str(path), stage_forward_names(manifest, a, b), exact=exact)
        tensors = run_stage(open_session(path, 1, exact), spec, tensors)
        assert set(tensors) == set(manifest.boundaries[b].names), (a, b, sorted(tensors))
    return tensors


def run_monolithic(
    model: onnx.ModelProto, inputs: dict[str, np.ndarray], exact: bool
) -> dict[str, np.ndarray]:
    session = open_session(model.SerializeToString(), 1, exact)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def partitions(n: int) -> list[list[tuple[int, int]]]:
    """A few ways to group ``n`` blocks into contiguous stages (always every block alone and all in one)."""
    parts = [[(k, k + 1) for k in range(n)], [(0, n)]]
    if n >= 2:
        h = n // 2
        parts.append([(0, h), (h, n)])
    if n >= 4:
        parts.append([(0, 1), (1, n - 1), (n - 1, n)])
    return parts
