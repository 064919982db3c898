"""Pure graph analysis for slicing: topological order, constants, and the live tensors at every cut.

[Note: what counts as live]
The non-constant top-level nodes are put in one topological order (the model's own order when it is
one). Cut ``p`` (0 <= p <= n) lies between node ``p - 1`` and node ``p`` of that order. A tensor is live
at cut ``p`` when it is defined before the cut (a graph input, or an output of a node before ``p``) and
needed at or after it (consumed by a node at position >= p, or a graph output). Constants never count:
initializers, ``Constant`` nodes and every node whose inputs are all constant (transitively) are copied into
each block that uses them. Random ops and control-flow nodes are never constant. A control-flow node
(If/Loop/Scan) stays whole; the outer-scope tensors its subgraphs read count as its inputs.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from layerline.errors import SliceError

__all__ = [
    "GraphAnalysis",
    "analyze_graph",
    "live_sets",
    "node_consumes",
    "subgraph_outer_refs",
    "topological_order",
]

#: Ops whose result changes from run to run: never folded into constants nor duplicated.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def subgraph_outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads that it does not define itself: references to an enclosing scope."""
    defined = {i.name for i in graph.input}
    defined.update(t.name for t in graph.initializer)
    defined.update(t.values.name for t in graph.sparse_initializer)
    used: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        defined.update(node.output)
        used.update(node.input)
        for sub in _subgraphs(node):
            used |= subgraph_outer_refs(sub)
    return used - defined - {""}


def node_consumes(node: onnx.NodeProto) -> tuple[str, ...]:
    """The tensors a node reads: its inputs, then (sorted) the outer-scope names its subgraphs read."""
    names = [n for n in node.input if n]
    outer: set[str] = set()
    for sub in _subgraphs(node):
        outer |= subgraph_outer_refs(sub)
    return tuple(dict.fromkeys([*names, *sorted(outer - set(names))]))


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(True for _ in _subgraphs(node))


def topological_order(graph: onnx.GraphProto, consumes: list[tuple[str, ...]] | None = None) -> list[int]:
    """Indices of ``graph.node`` in a topological order, keeping the model's order wherever it allows."""
    consumes = consumes if consumes is not None else [node_consumes(n) for n in graph.node]
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    available |= {t.values.name for t in graph.sparse_initializer}
    producer: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer or out in available:
                raise SliceError(
                    f"tensor {out!r} is defined twice (node {idx} {node.op_type!r} and an earlier one); "
                    "the model is not valid ONNX - run onnx.checker.check_model on it and fix the export"
                )
            producer[out] = idx
    waiting = [0] * len(graph.node)
    users: list[list[int]] = [[] for _ in graph.node]
    for idx, names in enumerate(consumes):
        for name in dict.fromkeys(names):
            if name in available:
                continue
            src = producer.get(name)
            if src is None:
                raise SliceError(
                    f"node {idx} ({graph.node[idx].op_type!r}, name {graph.node[idx].name!r}) reads tensor "
                    f"{name!r} that no node, graph input or initializer defines; fix the model export"
                )
            waiting[idx] += 1
            users[src].append(idx)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        idx = heapq.heappop(ready)
        order.append(idx)
        for user in users[idx]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(graph.node):
        stuck = sorted(set(range(len(graph.node))) - set(order))[:5]
        raise SliceError(f"the graph has a cycle through nodes {stuck}; layerline slices acyclic graphs only")
    return order


@dataclass(frozen=True)
class GraphAnalysis:
    """The slicing view of one graph.

    ``order``: the non-constant nodes (indices into ``graph.node``) in topological order; cut ``p`` lies
    before ``order[p]``. ``const_order``: the constant nodes, topologically. ``constants``: every constant
    tensor name. ``consumes[i]``: what ``graph.node[i]`` reads. ``producer``: tensor name -> node index.
    ``inputs``: graph inputs that are not initializers; ``outputs``: graph output names.
    ``defined_at``/``last_use``: per live-able tensor, the position of its producer (-1: a graph input) and
    of its last consumer (``len(order)``: a graph output).
    """

    order: tuple[int, ...]
    const_order: tuple[int, ...]
    constants: frozenset[str]
    consumes: tuple[tuple[str, ...], ...]
    producer: dict[str, int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    defined_at: dict[str, int]
    last_use: dict[str, int]

    @property
    def num_positions(self) -> int:
        return len(self.order)


def analyze_graph(graph: onnx.GraphProto) -> GraphAnalysis:
    """Order the nodes, find the constants and where each non-constant tensor is defined and last used."""
    consumes = [node_consumes(n) for n in graph.node]
    full_order = topological_order(graph, consumes)
    init_names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    constants = set(init_names)
    const_nodes: list[int] = []
    order: list[int] = []
    for idx in full_order:
        node = graph.node[idx]
        is_const = (
            node.op_type not in _NONDETERMINISTIC
            and not _has_subgraph(node)
            and all(name in constants for name in consumes[idx])
        )
        if is_const:
            const_nodes.append(idx)
            constants.update(o for o in node.output if o)
        else:
            order.append(idx)
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    inputs = tuple(i.name for i in graph.input if i.name not in init_names)
    outputs = tuple(o.name for o in graph.output)
    defined_at: dict[str, int] = dict.fromkeys(inputs, -1)
    for pos, idx in enumerate(order):
        for out in graph.node[idx].output:
            if out:
                defined_at[out] = pos
    last_use: dict[str, int] = {}
    for pos, idx in enumerate(order):
        for name in consumes[idx]:
            if name in defined_at:
                last_use[name] = pos
    for name in outputs:
        if name in defined_at:
            last_use[name] = len(order)
    return GraphAnalysis(
        order=tuple(order),
        const_order=tuple(const_nodes),
        constants=frozenset(constants),
        consumes=tuple(consumes),
        producer=producer,
        inputs=inputs,
        outputs=outputs,
        defined_at=defined_at,
        last_use=last_use,
    )


def live_sets(analysis: GraphAnalysis) -> list[tuple[str, ...]]:
    """For every cut position ``p`` in ``0..n``, the live non-constant tensors, ordered by definition.

    Position 0 holds the graph inputs some node or output needs; position ``n`` the non-constant outputs.
    """
    n = analysis.num_positions
    rank = {name: i for i, name in enumerate(analysis.defined_at)}  # insertion order = definition order
    starts: list[list[str]] = [[] for _ in range(n + 1)]
    ends: list[list[str]] = [[] for _ in range(n + 2)]
    for name, d in analysis.defined_at.items():
        u = analysis.last_use.get(name)
        if u is None or u <= d:
            continue
        starts[d + 1].append(name)  # live from cut d+1 ...
        ends[u + 1].append(name)  # ... through cut u
    live: set[str] = set()
    result: list[tuple[str, ...]] = []
    for p in range(n + 1):
        live.difference_update(ends[p])
        live.update(starts[p])
        result.append(tuple(sorted(live, key=rank.__getitem__)))
    return result
