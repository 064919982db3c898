"""Per-node cost estimates: which ops are compute-heavy, and an estimate of FLOPs at batch 1.

[Note: the FLOP estimate]
It is an estimate for balancing blocks, not a measurement. A multiply-add counts as 2 FLOPs:
Conv ``2 * out_elements * (C_in / group) * prod(kernel)``; ConvTranspose ``2 * in_elements * (C_out / group)
* prod(kernel)``; Gemm ``2 * M * N * K``; MatMul ``2 * out_elements * K``. Biases are ignored. Every other op
costs 1 FLOP per output element. Shapes come from shape inference with the batch dimension set to 1; a
dimension that is still unknown counts as 1, so dynamic sequence lengths are under-counted. A control-flow
node costs the sum of its subgraphs' nodes (every branch, a Loop body once).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx

__all__ = ["HEAVY_OPS", "ShapeOf", "is_heavy", "node_flops"]

#: Ops that do the bulk of a network's arithmetic; a "layer" block holds at least one of them.
HEAVY_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "DeformConv",
        "Gemm",
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "MatMulNBits",
        "FusedMatMul",
        "Einsum",
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "LSTM",
        "GRU",
        "RNN",
    }
)

#: Looks up a tensor's shape at batch 1 (unknown dims as 1), or None when its rank is unknown.
ShapeOf = Callable[[str], "tuple[int, ...] | None"]


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            subs.extend(attr.graphs)
    return subs


def is_heavy(node: onnx.NodeProto) -> bool:
    """True for compute-heavy ops, and for control-flow nodes whose subgraphs contain one."""
    if node.op_type in HEAVY_OPS:
        return True
    return any(is_heavy(n) for g in _subgraphs(node) for n in g.node)


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _numel(shape: tuple[int, ...] | None) -> int:
    return 0 if shape is None else math.prod(shape)


def node_flops(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Estimated FLOPs of one node at batch 1 (see the module note)."""
    op = node.op_type
    outs = [shape_of(o) for o in node.output if o]
    out0 = outs[0] if outs else None
    ins = [shape_of(i) if i else None for i in node.input]
    if op == "Conv" and len(ins) > 1 and out0 is not None and ins[1] is not None and len(ins[1]) >= 2:
        w = ins[1]  # (C_out, C_in / group, k...)
        return 2 * _numel(out0) * math.prod(w[1:])
    if op == "ConvTranspose" and len(ins) > 1 and ins[0] is not None and ins[1] is not None:
        w = ins[1]  # (C_in, C_out / group, k...)
        if len(w) >= 2:
            return 2 * _numel(ins[0]) * math.prod(w[1:])
    if op == "Gemm" and len(ins) > 1 and ins[0] is not None and ins[1] is not None:
        a, b = ins[0], ins[1]
        if len(a) == 2 and len(b) == 2:
            m, k = (a[1], a[0]) if _attr_int(node, "transA", 0) else (a[0], a[1])
            n = b[0] if _attr_int(node, "transB", 0) else b[1]
            return 2 * m * n * k
    if op == "MatMul" and len(ins) > 1 and ins[0] is not None and out0 is not None and ins[0]:
        return 2 * _numel(out0) * ins[0][-1]
    subs = _subgraphs(node)
    if subs:
        return sum(node_flops(n, shape_of) for g in subs for n in g.node)
    return sum(_numel(s) for s in outs)
