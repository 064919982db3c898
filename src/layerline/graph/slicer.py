"""``slice_model``: cut an ONNX model into ordered blocks and write them with a manifest.

The steps are pure functions elsewhere (``liveness``: order and live sets; ``cuts``: the cut rule;
``blocks``: extracting one block; ``cost``: FLOP estimates); this module checks the options, handles the
output directory and the files, and assembles the :class:`~layerline.graph.manifest.Manifest`.
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import onnx

from layerline.errors import SliceError
from layerline.graph.blocks import extract_block
from layerline.graph.cost import ShapeOf, is_heavy, node_flops
from layerline.graph.cuts import GRANULARITIES, choose_cuts
from layerline.graph.extdata import (
    external_locations,
    relocate,
    require_files,
    share_data_files,
    write_model,
)
from layerline.graph.liveness import GraphAnalysis, analyze_graph, live_sets
from layerline.graph.manifest import MANIFEST_FILE, BlockInfo, Boundary, BoundaryTensor, Manifest
from layerline.graph.modelio import (
    EXTERNAL_DATA_THRESHOLD,
    dtype_name,
    infer_types,
    iter_tensors,
    load_source,
    save_model_file,
    spec_bytes,
    tensor_nbytes,
    type_to_spec,
)
from layerline.tensors import TensorSpec

__all__ = ["block_file_name", "slice_model"]

log = logging.getLogger(__name__)

_OUTPUT_FILE = re.compile(r"^(block_\d{3,}\.(onnx|data)|source_\d{3,}\.data|manifest\.json(\.tmp)?)$")


def block_file_name(index: int) -> str:
    return f"block_{index:03d}.onnx"


def _check_options(max_live_tensors: object, granularity: object, max_blocks: object) -> None:
    if isinstance(max_live_tensors, bool) or not isinstance(max_live_tensors, int) or max_live_tensors < 1:
        raise SliceError(
            f"max_live_tensors must be an integer >= 1, got {max_live_tensors!r}; "
            "it is how many tensors may cross a cut (default 4)"
        )
    if granularity not in GRANULARITIES:
        raise SliceError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if max_blocks is not None and (
        isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1
    ):
        raise SliceError(f"max_blocks must be an integer >= 1 or None (no limit), got {max_blocks!r}")


def _check_out_dir(out: Path, overwrite: bool) -> list[Path]:
    """The previous slice outputs to delete before writing; raises when ``out`` cannot be used."""
    if out.exists() and not out.is_dir():
        raise SliceError(f"output path {out} exists and is not a directory; choose a directory path")
    if not out.exists():
        return []
    entries = sorted(out.iterdir())
    if not entries:
        return []
    if not overwrite:
        raise SliceError(
            f"output directory {out} is not empty; pass overwrite=True (--overwrite) to replace a previous "
            "slice there, or choose a new directory"
        )
    foreign = [p.name for p in entries if not (p.is_file() and _OUTPUT_FILE.match(p.name))]
    if foreign:
        raise SliceError(
            f"output directory {out} holds files that are not a layerline slice output ({foreign[:5]}); "
            "refusing to overwrite it - choose an empty or new directory"
        )
    return entries


def _check_source_files(
    base_dir: Path | None, source: str | None, locations: list[str], stale: list[Path]
) -> None:
    """Before anything is deleted: the source's data files exist, and overwriting spares the source."""
    if base_dir is None:
        return
    require_files(base_dir, locations)
    if not stale:
        return
    doomed = {p.resolve() for p in stale}
    mine = [base_dir / f for f in [source or "", *locations] if f and (base_dir / f).resolve() in doomed]
    if mine:
        raise SliceError(
            f"{mine[0]} belongs to the model being sliced and would be deleted by overwriting its directory; "
            "slice into another directory"
        )


def _inspect_cuts(
    live: list[tuple[str, ...]], types: dict[str, onnx.TypeProto]
) -> tuple[dict[int, str], dict[int, int | None]]:
    """Per inner cut position: why it cannot carry its tensors (untyped ones), else its bytes at batch 1."""
    problems: dict[int, str] = {}
    cut_bytes: dict[int, int | None] = {}
    for p in range(1, len(live) - 1):
        specs = [type_to_spec(t, types.get(t)) for t in live[p]]
        untyped = [t for t, s in zip(live[p], specs, strict=True) if s is None]
        if untyped:
            problems[p] = f"tensor(s) {untyped} have no inferred type or rank"
            continue
        sizes = [spec_bytes(s) for s in specs if s is not None]
        cut_bytes[p] = None if any(b is None for b in sizes) else sum(b for b in sizes if b is not None)
    return problems, cut_bytes


def _shape_lookup(types: dict[str, onnx.TypeProto]) -> ShapeOf:
    def shape_of(name: str) -> tuple[int, ...] | None:
        spec = type_to_spec(name, types.get(name))
        if spec is None:
            return None
        return tuple(1 if isinstance(d, str) or d <= 0 else d for d in spec.shape)

    return shape_of


def _io_spec(name: str, tp: onnx.TypeProto | None, what: str) -> TensorSpec:
    spec = type_to_spec(name, tp)
    if spec is not None:
        return spec
    if tp is not None and tp.WhichOneof("value") not in (None, "tensor_type"):
        raise SliceError(
            f"model {what} {name!r} is a {tp.WhichOneof('value')}, not a tensor; "
            "layerline carries tensors only"
        )
    log.warning("model %s %r has no known shape; recorded with shape ()", what, name)
    elem = tp.tensor_type.elem_type if tp is not None and tp.HasField("tensor_type") else 0
    return TensorSpec(name, dtype_name(elem or onnx.TensorProto.FLOAT), ())


def _describe(analysis: GraphAnalysis, graph: onnx.GraphProto, p: int) -> str:
    node = graph.node[analysis.order[p - 1]]
    return f"after node {p - 1} ({node.op_type} {node.name!r})"


def _no_cut_error(model_name, analysis, graph, live, problems, max_live) -> SliceError:
    n = analysis.num_positions
    if n < 2:
        return SliceError(
            f"model {model_name!r} has {n} compute node(s): there is nothing to cut; run it as a single stage"
        )
    p = min(range(1, n), key=lambda q: (len(live[q]), q))
    detail = ", ".join(live[p])
    hint = problems.get(p)
    if hint:
        return SliceError(
            f"no valid cut in model {model_name!r}: at the narrowest point ({_describe(analysis, graph, p)}) "
            f"{len(live[p])} tensor(s) are live [{detail}] and {hint}. Run onnx shape inference on the model "
            "or export it with static shapes so every boundary tensor has a known type and rank"
        )
    return SliceError(
        f"no valid cut in model {model_name!r} with max_live_tensors={max_live}: at the narrowest point "
        f"({_describe(analysis, graph, p)}) {len(live[p])} tensors are live [{detail}]. Raise "
        f"--max-live-tensors to {len(live[p])} (max_live_tensors={len(live[p])}), or export the model with "
        "static shapes so that shape-computing side branches fold into constants"
    )


def slice_model(
    model: onnx.ModelProto | str | Path,
    out_dir: str | Path,
    *,
    max_live_tensors: int = 4,
    granularity: str = "layer",
    max_blocks: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
    copy_external_data: bool = False,
) -> Manifest:
    """Cut ``model`` into blocks, write ``block_NNN.onnx`` files and ``manifest.json`` to ``out_dir``.

    A model file whose weights are ONNX external data is sliced without copying them: ``out_dir`` gets a
    hard link ``source_NNN.data`` to each of its data files, which the blocks reference (a copy where no
    hard link can be made, or with ``copy_external_data``). See ``layerline.graph.cuts`` for the cut rule
    and ``docs/manifest.md`` for the output.
    Raises SliceError when no valid cut exists, an option is bad, or ``out_dir`` is not usable.
    """
    _check_options(max_live_tensors, granularity, max_blocks)
    out = Path(out_dir)
    stale = _check_out_dir(out, overwrite)
    proto, base_dir, source = load_source(model)
    model_name = name or proto.graph.name or (Path(source).stem if source else "model")
    graph = proto.graph

    types = infer_types(proto, base_dir)
    analysis = analyze_graph(graph)
    live = live_sets(analysis)
    n = analysis.num_positions

    problems, cut_bytes = _inspect_cuts(live, types)
    valid = [p for p in range(1, n) if p not in problems and len(live[p]) <= max_live_tensors]
    if not valid:
        raise _no_cut_error(model_name, analysis, graph, live, problems, max_live_tensors)

    shape_of = _shape_lookup(types)
    order_nodes = [graph.node[i] for i in analysis.order]
    flops = [node_flops(node, shape_of) for node in order_nodes]
    heavy = [is_heavy(node) for node in order_nodes]
    live_count = {p: len(live[p]) for p in valid}
    cuts = choose_cuts(valid, heavy, flops, cut_bytes, granularity, max_blocks, live_count)
    log.info(
        "slicing %s: %d compute nodes, %d valid cuts (max %d live), %d blocks",
        model_name,
        n,
        len(valid),
        max_live_tensors,
        len(cuts) + 1,
    )

    weights = sum(tensor_nbytes(t) for t in iter_tensors(graph))
    locations = external_locations(proto) if base_dir is not None else []
    external = bool(locations) or weights > EXTERNAL_DATA_THRESHOLD
    _check_source_files(base_dir, source, locations, stale)
    for path in stale:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    data_files, data_names = (
        share_data_files(base_dir, locations, out, copy=copy_external_data)
        if base_dir is not None and locations
        else ((), {})
    )

    in_specs = tuple(_io_spec(i, types.get(i), "input") for i in analysis.inputs)
    out_specs = tuple(_io_spec(o, types.get(o), "output") for o in analysis.outputs)
    spec_of = {s.name: s for s in (*in_specs, *out_specs)}

    def boundary(k: int, names: tuple[str, ...] | list[str]) -> Boundary:
        specs = [spec_of.get(t) or type_to_spec(t, types.get(t)) for t in names]
        return Boundary(k, tuple(BoundaryTensor(s, spec_bytes(s)) for s in specs if s is not None))

    positions = [0, *cuts, n]
    blocks: list[BlockInfo] = []
    boundaries = [Boundary(0, tuple(BoundaryTensor(s, spec_bytes(s)) for s in in_specs))]
    for k, (a, b) in enumerate(itertools.pairwise(positions)):
        is_last = b == n
        bg = extract_block(
            proto,
            analysis,
            types,
            range(a, b),
            live[a],
            live[b],
            name=f"{model_name}.block{k:03d}",
            is_last=is_last,
        )
        file = block_file_name(k)
        data_file = None
        if data_names:  # reference the shared data files (small tensors are read in)
            relocate(bg.model, data_names, base_dir)
            write_model(bg.model, out / file)
        else:
            data_file = save_model_file(bg.model, out / file, external=external, base_dir=base_dir)
        boundaries.append(boundary(k + 1, analysis.outputs if is_last else live[b]))
        blocks.append(
            BlockInfo(
                index=k,
                file=file,
                data_file=data_file,
                inputs=tuple(boundaries[k].specs[boundaries[k].names.index(i)] for i in bg.inputs),
                outputs=tuple(boundaries[k + 1].specs[boundaries[k + 1].names.index(o)] for o in bg.outputs),
                weight_bytes=bg.weight_bytes,
                op_counts=bg.op_counts,
                flops=sum(flops[a:b]),
                num_nodes=bg.num_nodes,
            )
        )
    manifest = Manifest(
        model_name=model_name,
        source=source,
        ir_version=proto.ir_version,
        opset_imports={o.domain: o.version for o in proto.opset_import},
        inputs=in_specs,
        outputs=out_specs,
        blocks=tuple(blocks),
        boundaries=tuple(boundaries),
        max_live_tensors=max_live_tensors,
        granularity=granularity,
        external_data=external,
        data_files=data_files,
    )
    manifest.save(out)
    log.info("wrote %d blocks and %s to %s", len(blocks), MANIFEST_FILE, out)
    return manifest
