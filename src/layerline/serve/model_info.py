"""What the gateway knows about the model it serves: name, version and the tensors it takes and gives.

Also the mapping between numpy dtype names (as in :class:`~layerline.tensors.TensorSpec`) and the datatype
names of the Open Inference Protocol v2 (``FP32``, ``INT64``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerline.errors import FormatError
from layerline.tensors import TensorSpec

__all__ = [
    "FORMAT_VERSION",
    "OIP_DATATYPES",
    "ModelInfo",
    "numpy_dtype_for",
    "oip_datatype",
    "oip_shape",
    "spec_from_oip",
]

FORMAT_VERSION = 1

#: OIP v2 datatype name -> numpy dtype name, for every datatype the gateway can carry.
#: ``BYTES`` (strings) and ``BF16`` have no plain numpy equivalent and are not supported.
OIP_DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_NUMPY_TO_OIP = {v: k for k, v in OIP_DATATYPES.items()}


def oip_datatype(dtype: str | np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (``"float32"`` -> ``"FP32"``); ValueError if it has none."""
    name = np.dtype(dtype).name
    try:
        return _NUMPY_TO_OIP[name]
    except KeyError:
        raise ValueError(f"numpy dtype {name} has no Open Inference Protocol datatype") from None


def numpy_dtype_for(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype name; ValueError naming the accepted names if it is unknown."""
    try:
        return np.dtype(OIP_DATATYPES[datatype])
    except (KeyError, TypeError):
        accepted = ", ".join(OIP_DATATYPES)
        raise ValueError(f"unknown datatype {datatype!r}; use one of {accepted}") from None


def oip_shape(spec: TensorSpec) -> list[int]:
    """The spec's shape as OIP metadata writes it: -1 for every dynamic dimension."""
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def spec_from_oip(entry: dict[str, Any]) -> TensorSpec:
    """A TensorSpec from an OIP metadata tensor (``{"name", "datatype", "shape"}``); -1 becomes ``"?"``."""
    try:
        shape = tuple("?" if int(d) < 0 else int(d) for d in entry["shape"])
        return TensorSpec(str(entry["name"]), numpy_dtype_for(entry["datatype"]).name, shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"model metadata has a malformed tensor {entry!r}: {exc}") from exc


@dataclass(frozen=True)
class ModelInfo:
    """The served model as clients see it: its name and version, and its inputs and outputs in order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    version: str = "1"
    platform: str = "onnxruntime"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"model name must be non-empty and contain no '/', got {self.name!r}")
        if not self.inputs or not self.outputs:
            raise ValueError(f"model {self.name!r} needs at least one input and one output")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    def input(self, name: str) -> TensorSpec | None:
        """The input spec called ``name``, or None."""
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output spec called ``name``, or None."""
        return next((s for s in self.outputs if s.name == name), None)

    def metadata(self) -> dict[str, Any]:
        """The OIP ``GET /v2/models/{name}`` answer."""

        def tensor(spec: TensorSpec) -> dict[str, Any]:
            return {"name": spec.name, "datatype": oip_datatype(spec.dtype), "shape": oip_shape(spec)}

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [tensor(s) for s in self.inputs],
            "outputs": [tensor(s) for s in self.outputs],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "platform": self.platform,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"model info has format_version {version!r}, this layerline reads {FORMAT_VERSION}; "
                "regenerate it with this version of layerline"
            )
        try:
            return cls(
                name=str(data["name"]),
                version=str(data.get("version", "1")),
                platform=str(data.get("platform", "onnxruntime")),
                inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"model info is malformed ({exc}); regenerate it") from exc

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ModelInfo:
        """The model described by an OIP ``GET /v2/models/{name}`` answer (dynamic dims become ``"?"``)."""
        try:
            versions = meta.get("versions") or ["1"]
            return cls(
                name=str(meta["name"]),
                version=str(versions[-1]),
                platform=str(meta.get("platform", "onnxruntime")),
                inputs=tuple(spec_from_oip(t) for t in meta["inputs"]),
                outputs=tuple(spec_from_oip(t) for t in meta["outputs"]),
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"model metadata is malformed ({exc})") from exc

    @classmethod
    def from_onnx(cls, model: str | Path | Any, name: str, version: str = "1") -> ModelInfo:
        """Inputs and outputs of an ONNX model (a path or a ``ModelProto``); initializers are skipped."""
        import onnx

        proto = onnx.load(str(model), load_external_data=False) if isinstance(model, str | Path) else model
        graph = proto.graph
        weights = {t.name for t in graph.initializer}
        inputs = tuple(_spec_of(v) for v in graph.input if v.name not in weights)
        outputs = tuple(_spec_of(v) for v in graph.output)
        return cls(name=name, inputs=inputs, outputs=outputs, version=version)


def _spec_of(value: Any) -> TensorSpec:
    """TensorSpec of an ONNX ``ValueInfoProto`` (dynamic dims: their dim_param, or ``"?"``)."""
    from onnx import helper

    ttype = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
    dims: list[int | str] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return TensorSpec(value.name, dtype, tuple(dims))
