"""File-level helpers for slicing: loading, shape inference without the weights, sizes, saving.

[Note: weights stay out of shape inference]
``onnx.shape_inference`` serializes the model, which fails past protobuf's 2 GiB limit. We infer on a
skeleton instead: the graph with every initializer over 4 KiB replaced by a data-less stand-in marked as
external data (dims and type kept, which is all inference reads from a weight). That is what
``infer_shapes_path`` does for a model saved with external data, but it also works for in-memory models
and never writes a temporary copy. Small tensors (shape vectors, axes) keep their values - read from the
external data file when the model keeps them there - so data propagation through ``Reshape``/``Slice``
still works.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from layerline.errors import SliceError
from layerline.tensors import TensorSpec

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "dtype_name",
    "has_external_data",
    "infer_types",
    "iter_tensors",
    "load_source",
    "load_tensor_data",
    "location_of",
    "node_tensor_bytes",
    "save_model_file",
    "spec_bytes",
    "tensor_nbytes",
    "type_to_spec",
]

log = logging.getLogger(__name__)

#: Weight bytes above which block and stage files keep their weights in ONNX external data files:
#: below protobuf's 2 GiB limit, with room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000

_SKELETON_MIN_BYTES = 4096
_SKELETON_LOCATION = "__layerline_shape_inference_only__"


def load_source(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, Path | None, str | None]:
    """The model, the directory its external data is relative to, and its file name.

    A path is loaded without its external data: blocks read the tensors they need from there one block at
    a time, so a model bigger than memory allows is never loaded whole.
    """
    if isinstance(model, onnx.ModelProto):
        if has_external_data(model):
            raise SliceError(
                "the in-memory model refers to external data files that layerline cannot locate; "
                "pass the model's file path instead, or load it with onnx.load(path) (external data included)"
            )
        return model, None, None
    path = Path(model)
    if not path.is_file():
        raise SliceError(f"model file {path} does not exist; check the path")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise SliceError(f"cannot read {path} as an ONNX model ({exc}); is it a .onnx file?") from exc
    return proto, path.resolve().parent, path.name


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield attr.t
        elif attr.type == onnx.AttributeProto.TENSORS:
            yield from attr.tensors
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        elif attr.type == onnx.AttributeProto.GRAPH:
            yield from iter_tensors(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                yield from iter_tensors(g)


def node_tensor_bytes(nodes: Iterable[onnx.NodeProto]) -> int:
    """Bytes of the tensors stored in these nodes' attributes (Constant values, subgraph weights)."""
    return sum(tensor_nbytes(t) for n in nodes for t in _node_tensors(n))


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in iter_tensors(model.graph))


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (external data is not read)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (math.prod(tensor.dims) + 1) // 2
    return math.prod(tensor.dims) * itemsize


def location_of(tensor: onnx.TensorProto) -> str:
    """The ``location`` of a tensor stored as external data, normalised; raises SliceError when unsafe."""
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    norm = posixpath.normpath(location.replace("\\", "/")) if location else ""
    if not norm or norm == "." or posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise SliceError(
            f"tensor {tensor.name!r} keeps its data at location {location!r}, which is empty, absolute or "
            "outside the model's directory; save the model with its data file next to it "
            "(onnx.save(model, path, save_as_external_data=True, location='NAME.data'))"
        )
    return norm


def load_tensor_data(tensor: onnx.TensorProto, base_dir: Path) -> None:
    """Read an external tensor's bytes from ``base_dir`` into ``raw_data``.

    Unlike onnx's loader, this accepts a data file with several hard links (``layerline.graph.extdata``).
    """
    location = location_of(tensor)
    entries = {e.key: e.value for e in tensor.external_data}
    path = base_dir / location
    try:
        offset = int(entries.get("offset") or 0)
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int(entries["length"]) if entries.get("length") else size - offset
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError(f"bytes [{offset}, {offset + length}) lie outside the {size}-byte file")
            f.seek(offset)
            data = f.read(length)
    except (OSError, ValueError) as exc:
        raise SliceError(
            f"cannot read the external data of tensor {tensor.name!r} from {path} ({exc}); keep the "
            "model's data files next to it, where its external_data locations point"
        ) from exc
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def _skeleton(model: onnx.ModelProto, base_dir: Path | None) -> onnx.ModelProto:
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    g = skel.graph
    src = model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        if external_data_helper.uses_external_data(t):
            g.initializer.append(t)
            if base_dir is not None and tensor_nbytes(t) < _SKELETON_MIN_BYTES:
                load_tensor_data(g.initializer[-1], base_dir)  # shape vectors: inference reads them
            continue
        if t.ByteSize() < _SKELETON_MIN_BYTES:
            g.initializer.append(t)
            continue
        stub = g.initializer.add()
        stub.name = t.name
        stub.data_type = t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value=_SKELETON_LOCATION)
    return skel


def infer_types(model: onnx.ModelProto, base_dir: Path | None = None) -> dict[str, onnx.TypeProto]:
    """The type of every top-level tensor ONNX shape inference can tell, initializers included.

    ``base_dir``: where the model's external data lies; its small tensors are read for data propagation.
    """
    skel = _skeleton(model, base_dir)
    inferred = None
    for data_prop in (True, False):
        try:
            inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=data_prop)
            break
        except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError
            log.warning("shape inference (data_prop=%s) failed: %s", data_prop, exc)
    graph = inferred.graph if inferred is not None else model.graph
    types: dict[str, onnx.TypeProto] = {}
    for t in model.graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        if vi.HasField("type"):
            types[vi.name] = vi.type
    return types


def dtype_name(elem_type: int) -> str:
    """The numpy dtype name of an ONNX element type (``"object"`` for strings)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def type_to_spec(name: str, tp: onnx.TypeProto | None) -> TensorSpec | None:
    """A TensorSpec for a tensor type with a known element type and rank; None for anything else."""
    if tp is None or tp.WhichOneof("value") != "tensor_type":
        return None
    tt = tp.tensor_type
    if tt.elem_type == onnx.TensorProto.UNDEFINED or not tt.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
    return TensorSpec(name, dtype_name(tt.elem_type), dims)


def spec_bytes(spec: TensorSpec) -> int | None:
    """Bytes at batch 1, None when a non-batch dim is dynamic or the type has no fixed size."""
    if spec.dtype == "object":
        return None
    return spec.nbytes(1)


def save_model_file(
    model: onnx.ModelProto, path: Path, *, external: bool, base_dir: Path | None
) -> str | None:
    """Save ``model`` to ``path``; returns the external data file name written next to it, if any.

    Tensors still referring to the source model's external data are read from ``base_dir`` first.
    With ``external``, tensors of 1 KiB or more go to ``<stem>.data`` (replaced if it exists).
    """
    if has_external_data(model):
        if base_dir is None:
            raise SliceError("a tensor refers to external data but the source directory is unknown")
        for tensor in iter_tensors(model.graph):
            if external_data_helper.uses_external_data(tensor):
                load_tensor_data(tensor, base_dir)
    data_name = path.stem + ".data"
    data_path = path.parent / data_name
    if data_path.is_symlink() or data_path.exists():
        data_path.unlink()  # onnx appends to an existing data file (never write through a link)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        return data_name if data_path.exists() else None
    onnx.save_model(model, str(path))
    return None
