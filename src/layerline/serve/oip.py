"""The Open Inference Protocol v2 (KServe v2 REST) infer messages, with the binary tensor data extension.

Pure encoders and decoders, shared by the gateway (requests in, responses out) and by
:class:`~layerline.serve.client.GatewayClient` (the other way round). A message is a JSON object, optionally
followed by raw tensor bytes; then the ``Inference-Header-Content-Length`` header gives the JSON's length,
and each tensor carried in binary has a ``binary_data_size`` parameter instead of ``data``. Binary tensors
are row-major, little-endian, concatenated in the order the JSON lists them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerline.errors import BadRequest
from layerline.serve.model_info import ModelInfo, numpy_dtype_for, oip_datatype
from layerline.serve.validation import format_shape, normalize_array

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "RequestedOutput",
    "array_from_json",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "parse_infer_request",
]

#: The binary extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: its input arrays (not yet checked against the model) and wishes."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _split(body: bytes, header_length: str | int | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except (TypeError, ValueError):
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= n <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {n} but the body has only {len(body)} bytes")
    return body[:n], body[n:]


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")
    return obj


def _shape_of(entry: Mapping[str, Any], what: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"{what}: 'shape' must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise BadRequest(f"{what}: 'shape' {shape} has a negative dimension")
    return tuple(shape)


def _dtype_of(entry: Mapping[str, Any], what: str) -> np.dtype:
    try:
        return numpy_dtype_for(entry.get("datatype"))
    except ValueError as exc:
        raise BadRequest(f"{what}: {exc}") from None


def array_from_json(what: str, data: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The array of a JSON ``data`` field (flat row-major, or nested) with the given dtype and shape.

    Refuses values of another kind (``1.5`` for an INT64, ``true`` for an FP32, strings, nulls) and integers
    out of the datatype's range, instead of converting them silently.
    """
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"{what}: 'data' is not a flat or evenly nested list of numbers ({exc})") from None
    need = math.prod(shape)
    if raw.size != need:
        raise BadRequest(f"{what}: 'data' has {raw.size} values but shape {format_shape(shape)} needs {need}")
    if raw.size:
        kind = raw.dtype.kind
        allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
        if kind not in allowed:
            raise BadRequest(
                f"{what}: 'data' holds {_kind_words(kind)} but the datatype is {oip_datatype(dtype)}"
            )
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            lo, hi = int(raw.min()), int(raw.max())
            if lo < info.min or hi > info.max:
                raise BadRequest(
                    f"{what}: 'data' has values out of {oip_datatype(dtype)}'s range ({lo}..{hi})"
                )
    return raw.astype(dtype).reshape(shape)


def _kind_words(kind: str) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings"}.get(
        kind, "values that are not numbers (null, mixed, or too large)"
    )


def parse_infer_request(body: bytes, header_length: str | int | None, model: ModelInfo) -> InferRequest:
    """Decode an infer request's body (JSON, or JSON + binary tensors); BadRequest when it is malformed."""
    header, binary = _split(body, header_length)
    obj = _load_json(header)
    entries = obj.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise BadRequest("the request needs a non-empty 'inputs' list of {name, shape, datatype, data}")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("each entry of 'inputs' must be an object with a string 'name'")
        name = entry["name"]
        what = f"input '{name}'"
        if name in inputs:
            raise BadRequest(f"{what} is given twice")
        shape, dtype = _shape_of(entry, what), _dtype_of(entry, what)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"{what}: 'parameters' must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if "data" in entry:
                raise BadRequest(f"{what} has both 'data' and a binary_data_size; send one of them")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"{what}: binary_data_size must be a non-negative integer, got {size!r}")
            need = math.prod(shape) * dtype.itemsize
            if size != need:
                raise BadRequest(
                    f"{what}: binary_data_size is {size} but {oip_datatype(dtype)} {format_shape(shape)} "
                    f"takes {need} bytes"
                )
            if offset + size > len(binary):
                raise BadRequest(
                    f"{what}: the binary data ends after {len(binary)} bytes, but the inputs' "
                    f"binary_data_size add up to at least {offset + size}"
                )
            chunk = binary[offset : offset + size]
            offset += size
            inputs[name] = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape)
        elif "data" in entry:
            inputs[name] = array_from_json(what, entry["data"], dtype, shape)
        else:
            raise BadRequest(f"{what} has neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise BadRequest(
            f"the body carries {len(binary)} bytes of binary data but the inputs' binary_data_size "
            f"add up to {offset}"
        )

    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("the request's 'parameters' must be an object")
    default_binary = bool(params.get("binary_data_output", False))
    outputs = _requested_outputs(obj.get("outputs"), model, default_binary)
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"the request's 'id' must be a string, got {request_id!r}")
    return InferRequest({k: normalize_array(v) for k, v in inputs.items()}, outputs, request_id, params)


def _requested_outputs(entries: Any, model: ModelInfo, default_binary: bool) -> tuple[RequestedOutput, ...]:
    if entries is None:
        return tuple(RequestedOutput(s.name, default_binary) for s in model.outputs)
    if not isinstance(entries, list):
        raise BadRequest("the request's 'outputs' must be a list of {name, parameters}")
    names = ", ".join(f"'{s.name}'" for s in model.outputs)
    chosen: list[RequestedOutput] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("each entry of 'outputs' must be an object with a string 'name'")
        name = entry["name"]
        if model.output(name) is None:
            raise BadRequest(f"unknown output '{name}'; the model's outputs are {names}")
        if any(o.name == name for o in chosen):
            raise BadRequest(f"output '{name}' is requested twice")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"output '{name}': 'parameters' must be an object")
        chosen.append(RequestedOutput(name, bool(params.get("binary_data", default_binary))))
    return tuple(chosen)


def encode_infer_response(
    model: ModelInfo, outputs: Mapping[str, np.ndarray], request: InferRequest
) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary tensors follow it (else None)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for wanted in request.outputs:
        array = np.asarray(outputs[wanted.name])
        entry: dict[str, Any] = {
            "name": wanted.name,
            "datatype": oip_datatype(array.dtype),
            "shape": list(array.shape),
        }
        if wanted.binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    message: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        message["id"] = request.id
    message["outputs"] = entries
    header = json.dumps(message, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    binary: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """An infer request body for ``inputs``; with ``binary`` the tensors travel (and come back) as bytes."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        array = normalize_array(np.asarray(value))
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(array.shape),
            "datatype": oip_datatype(array.dtype),
        }
        if binary:
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    message: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        message["id"] = request_id
    if outputs is not None:
        message["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    if binary:
        message["parameters"] = {"binary_data_output": True}
    header = json.dumps(message, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def decode_infer_response(body: bytes, header_length: str | int | None) -> dict[str, np.ndarray]:
    """The output arrays of an infer response, by name, in the order the response lists them."""
    header, binary = _split(body, header_length)
    obj = _load_json(header)
    entries = obj.get("outputs")
    if not isinstance(entries, list):
        raise BadRequest("the response has no 'outputs' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("each entry of 'outputs' must be an object with a string 'name'")
        what = f"output '{entry['name']}'"
        shape, dtype = _shape_of(entry, what), _dtype_of(entry, what)
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != math.prod(shape) * dtype.itemsize:
                raise BadRequest(f"{what}: binary_data_size {size!r} does not fit {format_shape(shape)}")
            if offset + size > len(binary):
                raise BadRequest(f"{what}: the binary data is truncated")
            array = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<"))
            arrays[entry["name"]] = normalize_array(array.reshape(shape))
            offset += size
        else:
            arrays[entry["name"]] = array_from_json(what, entry.get("data"), dtype, shape)
    return arrays
