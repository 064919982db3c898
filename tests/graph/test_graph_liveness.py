"""The pure parts of slicing: order, constants, live sets, the cut rule and the FLOP estimate."""

from __future__ import annotations

import graph_models as gm
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from layerline.errors import SliceError
from layerline.graph import analyze_graph, live_sets, topological_order
from layerline.graph.cost import is_heavy, node_flops
from layerline.graph.cuts import balance_cuts, choose_cuts, layer_cuts
from layerline.graph.liveness import node_consumes


def _graph(nodes, inputs=("x",), outputs=("c",), inits=()):
    return helper.make_graph(
        nodes,
        "g",
        [gm.tensor(i, ["batch", 2]) for i in inputs],
        [gm.tensor(o, ["batch", 2]) for o in outputs],
        initializer=list(inits),
    )


def test_live_sets_of_a_hand_graph():
    # x -> A -> a -> B -> b; c = x + b: x stays live until the Add
    g = _graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Add", ["x", "b"], ["c"]),
        ]
    )
    analysis = analyze_graph(g)
    assert analysis.order == (0, 1, 2)
    assert live_sets(analysis) == [("x",), ("x", "a"), ("x", "b"), ("c",)]


def test_topological_order_keeps_a_valid_order_and_fixes_a_shuffled_one():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["x"], ["n"]),
        helper.make_node("Add", ["a", "n"], ["c"]),
    ]
    assert topological_order(_graph(nodes)) == [0, 1, 2]
    shuffled = [nodes[2], nodes[0], nodes[1]]
    assert topological_order(_graph(shuffled)) == [1, 2, 0]


def test_graph_errors_are_slice_errors():
    cycle = _graph([helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])])
    with pytest.raises(SliceError, match="cycle"):
        topological_order(cycle)
    undefined = _graph([helper.make_node("Add", ["x", "ghost"], ["c"])])
    with pytest.raises(SliceError, match="ghost"):
        topological_order(undefined)
    twice = _graph([helper.make_node("Relu", ["x"], ["c"]), helper.make_node("Neg", ["x"], ["c"])])
    with pytest.raises(SliceError, match="defined twice"):
        topological_order(twice)


def test_constant_subgraphs_do_not_count_as_live():
    w = numpy_helper.from_array(np.ones(2, dtype=np.float32), "w")
    g = _graph(
        [
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(2.0))),
            helper.make_node("Mul", ["w", "k"], ["wk"]),  # input-independent: folded into constants
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("RandomNormal", [], ["r"], shape=[2]),  # not deterministic: not a constant
            helper.make_node("Add", ["a", "wk"], ["b"]),
            helper.make_node("Add", ["b", "r"], ["c"]),
        ],
        inits=[w],
    )
    analysis = analyze_graph(g)
    assert analysis.constants == {"w", "k", "wk"}
    assert analysis.const_order == (0, 1)
    assert [g.node[i].op_type for i in analysis.order] == ["Relu", "RandomNormal", "Add", "Add"]
    assert live_sets(analysis) == [("x",), ("a",), ("a", "r"), ("r", "b"), ("c",)]


def test_graph_input_that_is_an_output_is_live_everywhere():
    g = _graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["c"])], outputs=("c", "x")
    )
    assert live_sets(analyze_graph(g)) == [("x",), ("x", "a"), ("x", "c")]


def test_subgraph_outer_references_are_node_inputs():
    model = gm.if_model()
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    consumes = node_consumes(if_node)
    assert consumes[0] == if_node.input[0] and set(consumes[1:]) == {"h", "Wt"}
    analysis = analyze_graph(model.graph)
    live = live_sets(analysis)
    pos = [model.graph.node[i].op_type for i in analysis.order].index("If")
    assert "h" in live[pos] and "Wt" not in live[pos]


def test_layer_cuts_pick_the_cheapest_cut_in_each_gap():
    heavy = [True, False, False, True, False, True, False]
    valid = [1, 2, 3, 4, 5, 6]
    sizes = {1: 100, 2: 50, 3: 50, 4: None, 5: 80, 6: 10}
    # gap (0, 3]: 2 and 3 tie at 50 -> the later one; gap (3, 5]: 4 is unknown -> 5; nothing after 5
    assert layer_cuts(valid, heavy, sizes) == [3, 5]
    # on equal bytes, fewer live tensors wins
    assert layer_cuts(valid, heavy, {**sizes, 2: 50, 3: 50}, {2: 1, 3: 2}) == [2, 5]
    # no valid cut between two heavy ops: they share a block
    assert layer_cuts([4, 5], heavy, sizes) == [5]
    # no heavy op at all: every op is a layer
    assert layer_cuts([1, 2], [False] * 3, {1: 8, 2: 8}) == [1, 2]


def test_balance_cuts_minimises_the_largest_block():
    flops = [10, 1, 1, 10]
    assert balance_cuts([1, 2, 3], flops, 2) == [2]
    assert balance_cuts([1, 2, 3], flops, 3) == [1, 3]
    assert balance_cuts([1, 2, 3], flops, 10) == [1, 2, 3]
    assert balance_cuts([1, 2, 3], flops, 1) == []
    assert choose_cuts([1, 2, 3], [True] * 4, flops, {}, "op", 2) == [2]


def test_flop_estimates():
    model = gm.chain_cnn()
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        vi.name: tuple(d.dim_value or 1 for d in vi.type.tensor_type.shape.dim)
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    flops = [node_flops(n, shapes.get) for n in model.graph.node]
    assert flops == [2 * 256 * 27, 256, 64, 2 * 128 * 36, 128, 32, 32, 2 * 10 * 32]
    assert [is_heavy(n) for n in model.graph.node] == [True, False, False, True, False, False, False, True]
    (if_node,) = [n for n in gm.if_model().graph.node if n.op_type == "If"]
    assert is_heavy(if_node)  # its then-branch holds a MatMul
    mm = helper.make_node("MatMul", ["a", "b"], ["c"])
    assert node_flops(mm, {"a": (1, 5, 8), "b": (8, 3), "c": (1, 5, 3)}.get) == 2 * 15 * 8
    ct = helper.make_node("ConvTranspose", ["a", "w"], ["c"])
    assert node_flops(ct, {"a": (1, 8, 2, 2), "w": (8, 4, 2, 2), "c": (1, 4, 4, 4)}.get) == 2 * 32 * 16
