"""Saving, checking and tidying ONNX models, shared by the importers and the example builders."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "check_model",
    "initializer_bytes",
    "name_batch_dim",
    "needs_external_data",
    "rename_tensor",
    "save_model",
    "set_metadata",
]

logger = logging.getLogger(__name__)

#: Models whose weights exceed this are saved with an external data file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data held inline by the model's graph."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too big to be serialised as one protobuf (its weights must go to a file)."""
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` (parents created); weights go to ``<name>.data`` beside it when the
    model is too big for one protobuf file (> ~2 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if needs_external_data(model):
        location = f"{path.name}.data"
        logger.info("saving %s with its weights in %s (model > 2 GB)", path, location)
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=1024,
        )
        # onnx.save_model moved the weights out of ``model`` (it clears raw_data): read them back.
        onnx.load_external_data_for_model(model, str(path.parent))
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.DEFAULT:
                tensor.ClearField("data_location")
    else:
        onnx.save_model(model, str(path))
    return path


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` for models of any size (big ones are checked without serialising)."""
    if needs_external_data(model):
        # The checker serialises the model, which protobuf refuses above 2 GB: check a copy whose weights
        # point to an (empty) external file instead; shapes and types are all still there.
        light = _without_weights(model)
        with tempfile.TemporaryDirectory(prefix="layerline-check-") as folder:
            (Path(folder) / "weights.data").touch()
            onnx.save_model(light, str(Path(folder) / "model.onnx"))
            onnx.checker.check_model(str(Path(folder) / "model.onnx"))
    else:
        onnx.checker.check_model(model)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inline weights are replaced by references to an external file."""
    light = onnx.ModelProto(
        ir_version=model.ir_version, domain=model.domain, model_version=model.model_version
    )
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(source, field))
    for original in source.initializer:
        tensor = light.graph.initializer.add()
        tensor.name, tensor.data_type = original.name, original.data_type
        tensor.dims.extend(original.dims)
        if original.HasField("raw_data"):
            tensor.data_location = onnx.TensorProto.EXTERNAL
            size = str(len(original.raw_data))
            for key, value in (("location", "weights.data"), ("offset", "0"), ("length", size)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        else:
            tensor.CopyFrom(original)
    return light


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph`` (nodes, graph inputs/outputs, value_info)."""
    if old == new:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


def name_batch_dim(model: onnx.ModelProto, batch: str = "batch") -> None:
    """Call the leading dimension of every graph input and output ``batch``.

    Exporters name it ``s0``, ``Add112_dim_0`` or similar; whatever symbol an input or output used for its
    first dimension is replaced by ``batch`` everywhere in the graph (value_info included), so that the
    batch dimension reads the same on every tensor that carries it.
    """
    graph = model.graph
    symbols: set[str] = set()
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            symbols.add(dims[0].dim_param)
        elif dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = batch
    if not symbols:
        return
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.dim_param = batch


def set_metadata(model: onnx.ModelProto, entries: Iterable[tuple[str, str]]) -> None:
    """Set (replace) ``metadata_props`` entries."""
    entries = dict(entries)
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for key, value in [*keep, *entries.items()]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, str(value)
