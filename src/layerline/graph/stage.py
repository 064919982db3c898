"""Merging a contiguous range of blocks into one stage graph.

A stage ``[start, stop)`` receives the tensors of ``boundaries[start]`` and must deliver those of
``boundaries[stop]``. Its ONNX graph takes the tensors the range reads from before ``start`` and returns
the ones the range produces that are in ``boundaries[stop]``; the rest of ``boundaries[stop]`` (received,
not produced) is passed on by the runtime untouched: :func:`stage_forward_names`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from layerline.errors import FormatError, SliceError
from layerline.graph.extdata import external_locations, link_file, relocate, write_model
from layerline.graph.manifest import Manifest
from layerline.graph.modelio import EXTERNAL_DATA_THRESHOLD, iter_tensors, load_tensor_data, save_model_file

__all__ = ["build_stage_model", "stage_forward_names", "write_stage_model"]

log = logging.getLogger(__name__)


def _check_range(manifest: Manifest, start: int, stop: int) -> None:
    n = manifest.num_blocks
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= n):
        raise SliceError(
            f"block range [{start}, {stop}) is not a non-empty range of the {n} blocks of "
            f"{manifest.model_name!r}; use 0 <= start < stop <= {n}"
        )


def stage_forward_names(manifest: Manifest, start: int, stop: int) -> tuple[str, ...]:
    """Names in ``boundaries[stop]`` that blocks ``[start, stop)`` do not produce: received and passed on."""
    _check_range(manifest, start, stop)
    produced = {s.name for b in manifest.blocks[start:stop] for s in b.outputs}
    return tuple(n for n in manifest.boundaries[stop].names if n not in produced)


def _merge(directory: Path, manifest: Manifest, start: int, stop: int, load_weights: bool) -> onnx.ModelProto:
    blocks = []
    for info in manifest.blocks[start:stop]:
        path = directory / info.file
        if not path.is_file():
            raise SliceError(f"block file {path} is missing; re-run `layerline slice` to rewrite {directory}")
        block = onnx.load(str(path), load_external_data=False)
        if load_weights:  # not onnx's loader: it refuses hard-linked data files (layerline.graph.extdata)
            for tensor in iter_tensors(block.graph):
                if uses_external_data(tensor):
                    load_tensor_data(tensor, directory)
        blocks.append(block)
    first = blocks[0]
    merged = onnx.ModelProto()
    merged.ir_version = first.ir_version
    merged.opset_import.extend(first.opset_import)
    merged.producer_name = "layerline"
    merged.doc_string = f"layerline stage: blocks [{start}, {stop}) of {manifest.model_name}"
    g = merged.graph
    g.name = f"{manifest.model_name}.blocks{start}-{stop}"
    functions: set[tuple[str, str, str]] = set()
    defined: set[str] = set()
    initializers: set[str] = set()
    inputs: dict[str, onnx.ValueInfoProto] = {}
    outputs: dict[str, onnx.ValueInfoProto] = {}
    value_info: dict[str, onnx.ValueInfoProto] = {}
    for block in blocks:
        for fn in block.functions:
            key = (fn.domain, fn.name, fn.overload)
            if key not in functions:
                functions.add(key)
                merged.functions.append(fn)
        for t in block.graph.initializer:
            if t.name not in initializers:  # a weight shared by several blocks: keep one copy
                initializers.add(t.name)
                g.initializer.append(t)
        for t in block.graph.sparse_initializer:
            if t.values.name not in initializers:
                initializers.add(t.values.name)
                g.sparse_initializer.append(t)
        for vi in block.graph.input:
            if vi.name not in defined and vi.name not in initializers and vi.name not in inputs:
                inputs[vi.name] = vi
        for node in block.graph.node:
            outs = [o for o in node.output if o]
            if outs and all(o in defined for o in outs):
                continue  # a constant node an earlier block already holds
            g.node.append(node)
            defined.update(outs)
        for vi in block.graph.output:
            outputs.setdefault(vi.name, vi)
        for vi in block.graph.value_info:
            value_info.setdefault(vi.name, vi)
    wanted = [n for n in manifest.boundaries[stop].names if n in outputs]
    received = manifest.boundaries[start].names
    rank = {n: i for i, n in enumerate(received)}
    g.input.extend(sorted(inputs.values(), key=lambda vi: rank.get(vi.name, len(rank))))
    g.output.extend(outputs[n] for n in wanted)
    for name, vi in outputs.items():
        if name not in wanted:
            value_info.setdefault(name, vi)
    g.value_info.extend(value_info.values())
    if merged.ir_version < 4:  # before IR 4, every initializer must also be a graph input
        init_inputs: dict[str, onnx.ValueInfoProto] = {}
        for block in blocks:
            for vi in block.graph.input:
                if vi.name in initializers:
                    init_inputs.setdefault(vi.name, vi)
        g.input.extend(init_inputs.values())
    merged.metadata_props.add(key="layerline.blocks", value=f"{start}:{stop}")
    return merged


def build_stage_model(sliced_dir: str | Path, start: int, stop: int) -> onnx.ModelProto:
    """One ONNX model running blocks ``[start, stop)`` of a sliced directory (weights loaded in memory)."""
    directory = Path(sliced_dir)
    manifest = Manifest.load(directory)
    _check_range(manifest, start, stop)
    return _merge(directory, manifest, start, stop, load_weights=True)


def _write_linked(merged: onnx.ModelProto, directory: Path, manifest: Manifest, target: Path) -> bool:
    """Write ``merged`` referencing hard links ``<stem>.source_NNN.data`` next to ``target`` to the sliced
    directory's data files (the files themselves when ``target`` is in that directory).

    Returns False, leaving no link behind, when a hard link cannot be made (another filesystem).
    """
    used = external_locations(merged)
    unknown = sorted(set(used) - {d.file for d in manifest.data_files})
    if unknown:
        raise FormatError(
            f"a block of {directory} references external data {unknown[0]!r}, which its manifest does not "
            "list; re-run `layerline slice` to rewrite the directory"
        )
    same_dir = target.parent.resolve() == directory.resolve()
    names: dict[str, str] = {}
    made: list[Path] = []
    try:
        for file in used:
            if same_dir:
                names[file] = file
                continue
            link = target.with_name(f"{target.stem}.{file}")
            link_file(directory / file, link, allow_copy=False)
            made.append(link)
            names[file] = link.name
    except OSError as exc:
        for link in made:
            link.unlink(missing_ok=True)
        log.warning(
            "cannot hard-link the data files of %s into %s (%s); copying the stage's weights instead",
            directory,
            target.parent,
            exc,
        )
        return False
    stale = target.with_name(target.stem + ".data")
    if stale.is_symlink() or stale.exists():
        stale.unlink()  # a copy from an earlier write of this stage
    relocate(merged, names)
    write_model(merged, target)
    return True


def write_stage_model(sliced_dir: str | Path, start: int, stop: int, path: str | Path) -> Path:
    """Write the stage model of blocks ``[start, stop)`` to ``path``; returns ``path``.

    Weights shared by merged blocks are stored once. When the blocks reference the sliced directory's
    shared data files (``Manifest.data_files``), the stage references hard links to them named
    ``<path stem>.source_NNN.data`` next to ``path``: no weight is copied. Otherwise (or when no hard link
    can be made there), when the sliced model uses external data or the stage's weights exceed
    ``EXTERNAL_DATA_THRESHOLD``, they are written to ``<path stem>.data`` next to ``path``.
    Raises FormatError when those data files changed or vanished since slicing.
    """
    directory = Path(sliced_dir)
    manifest = Manifest.load(directory)
    _check_range(manifest, start, stop)
    target = Path(path)
    own = {directory.resolve() / f for b in manifest.blocks for f in (b.file, b.data_file) if f}
    own |= {directory.resolve() / d.file for d in manifest.data_files}
    data = target.with_name(target.stem + ".data")
    links = [target.with_name(f"{target.stem}.{d.file}") for d in manifest.data_files]
    if any(p.resolve() in own for p in [target, data, *links]):
        raise SliceError(f"{target} would overwrite a block file of {directory}; write the stage elsewhere")
    merged = _merge(directory, manifest, start, stop, load_weights=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    if manifest.data_files and _write_linked(merged, directory, manifest, target):
        log.info(
            "wrote stage [%d, %d) of %s to %s (weights linked)", start, stop, manifest.model_name, target
        )
        return target
    weights = sum(b.weight_bytes for b in manifest.blocks[start:stop])
    external = manifest.external_data or weights > EXTERNAL_DATA_THRESHOLD
    save_model_file(merged, target, external=external, base_dir=directory)
    log.info("wrote stage [%d, %d) of %s to %s", start, stop, manifest.model_name, target)
    return target
