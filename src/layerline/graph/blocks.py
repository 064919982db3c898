"""Extracting one block (a contiguous run of the ordered compute nodes) as a standalone ONNX model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from layerline.graph.liveness import GraphAnalysis
from layerline.graph.modelio import node_tensor_bytes, tensor_nbytes

__all__ = ["BlockGraph", "extract_block"]


@dataclass
class BlockGraph:
    """A block's model plus what the manifest records about it."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int
    op_counts: dict[str, int]
    num_nodes: int


def _constant_closure(
    model: onnx.ModelProto, analysis: GraphAnalysis, needed: Sequence[str]
) -> tuple[list[int], list[str]]:
    """The constant nodes (in order) and initializer names that compute the ``needed`` constants."""
    nodes: set[int] = set()
    inits: dict[str, None] = {}
    stack = list(needed)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        idx = analysis.producer.get(name)
        if idx is None:
            inits[name] = None
            continue
        if idx not in nodes:
            nodes.add(idx)
            stack.extend(analysis.consumes[idx])
    return [i for i in analysis.const_order if i in nodes], list(inits)


def extract_block(
    model: onnx.ModelProto,
    analysis: GraphAnalysis,
    types: dict[str, onnx.TypeProto],
    positions: range,
    live_before: Sequence[str],
    live_after: Sequence[str],
    *,
    name: str,
    is_last: bool,
) -> BlockGraph:
    """Build the model of the block holding ``analysis.order[positions]``.

    Its inputs are the tensors of ``live_before`` its nodes read; its outputs are the tensors of
    ``live_after`` it produces (for the last block, also the model outputs that are constants).
    """
    graph = model.graph
    compute = [analysis.order[p] for p in positions]
    consumed: dict[str, None] = {}
    produced: set[str] = set()
    for idx in compute:
        consumed.update(dict.fromkeys(analysis.consumes[idx]))
        produced.update(o for o in graph.node[idx].output if o)
    inputs = [n for n in live_before if n in consumed and n not in produced]
    outputs = [n for n in live_after if n in produced]
    needed = [n for n in consumed if n in analysis.constants]
    if is_last:
        const_outputs = [n for n in analysis.outputs if n in analysis.constants]
        needed += const_outputs
        outputs = [n for n in analysis.outputs if n in produced or n in analysis.constants]
    const_nodes, init_names = _constant_closure(model, analysis, needed)
    missing = set(consumed) - produced - set(inputs) - analysis.constants
    assert not missing, f"block {name} reads {sorted(missing)} that are neither live nor constant"

    declared = {vi.name: vi for vi in [*graph.input, *graph.output]}
    original_vi = {vi.name: vi for vi in graph.value_info}

    def value_info(n: str) -> onnx.ValueInfoProto:
        if n in declared:
            return declared[n]
        tp = types.get(n)
        return helper.make_value_info(n, tp) if tp is not None else helper.make_empty_tensor_value_info(n)

    inits = {t.name: t for t in graph.initializer}
    sparse = {t.values.name: t for t in graph.sparse_initializer}
    block = onnx.ModelProto()
    block.ir_version = model.ir_version
    block.opset_import.extend(model.opset_import)
    block.functions.extend(model.functions)
    block.producer_name = "layerline"
    block.doc_string = f"layerline block {name}"
    g = block.graph
    g.name = name
    g.node.extend(graph.node[i] for i in [*const_nodes, *compute])
    g.input.extend(value_info(n) for n in inputs)
    g.output.extend(value_info(n) for n in outputs)
    g.initializer.extend(inits[n] for n in init_names if n in inits)
    g.sparse_initializer.extend(sparse[n] for n in init_names if n in sparse)
    if model.ir_version < 4:  # before IR 4, every initializer must also be a graph input
        g.input.extend(helper.make_value_info(n, types[n]) for n in init_names if n in inits)
    internal = (produced | {o for i in const_nodes for o in graph.node[i].output}) - set(outputs)
    g.value_info.extend(original_vi[n] for n in sorted(internal) if n in original_vi)

    weight = sum(tensor_nbytes(t) for t in g.initializer)
    weight += sum(tensor_nbytes(t.values) + tensor_nbytes(t.indices) for t in g.sparse_initializer)
    weight += node_tensor_bytes(g.node)
    ops = Counter(graph.node[i].op_type for i in compute)
    return BlockGraph(block, inputs, outputs, weight, dict(ops), len(compute))
