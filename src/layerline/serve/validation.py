"""Checks a request's tensors against the served model, before anything reaches the pipeline.

Pure functions; every rejection is a :class:`~layerline.errors.BadRequest` whose message names the input, what
the model expects and what was sent. The rules (see ``docs/http-api.md``):

- every model input must be present, and no other name;
- the element type must be the model's exactly: no cast is made, not even float64 -> float32;
- the rank and every fixed dimension must match; a dynamic dimension takes any size, except that the leading
  (batch) dimension must be at least 1, must be the same in every input whose leading dimension is dynamic,
  and a symbolic dimension name shared by several inputs must have one size;
- ``.npy``/``.npz`` bodies are read with ``allow_pickle=False`` (object arrays are refused, never unpickled);
  Fortran-order arrays are made C-contiguous and big-endian arrays are converted to native byte order.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

from layerline.errors import BadRequest
from layerline.serve.model_info import ModelInfo
from layerline.tensors import TensorSpec

__all__ = [
    "NPY_MAGIC",
    "NPZ_MAGIC",
    "PayloadTooLarge",
    "check_inputs",
    "decode_input_body",
    "decode_npy",
    "decode_npz",
    "describe_inputs",
    "encode_npy",
    "encode_npz",
    "format_shape",
    "normalize_array",
]

NPY_MAGIC = b"\x93NUMPY"
NPZ_MAGIC = b"PK\x03\x04"


class PayloadTooLarge(BadRequest):
    """The request body (or what it unpacks to) is larger than the gateway accepts (HTTP 413)."""

    http_status = 413


def format_shape(shape: tuple | list) -> str:
    """``(1, "batch", 3)`` -> ``"[1, batch, 3]"``."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def describe_inputs(model: ModelInfo) -> str:
    """``'x' (float32 [batch, 8]), 'mask' (int64 [batch, 8])`` — for error messages."""
    return ", ".join(f"'{s.name}' ({s.dtype} {format_shape(s.shape)})" for s in model.inputs)


def normalize_array(array: np.ndarray) -> np.ndarray:
    """The array in native byte order and C order (a copy only when needed)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


def _check_plain_dtype(array: np.ndarray, what: str) -> None:
    kind = array.dtype.kind
    if kind not in "biuf" or array.dtype.fields is not None or array.dtype.subdtype is not None:
        raise BadRequest(
            f"{what} has element type {array.dtype.str!r}; only plain numeric and bool arrays are accepted"
        )


def decode_npy(body: bytes) -> np.ndarray:
    """The array in a ``.npy`` file's bytes, normalized; BadRequest when it is not a valid numeric .npy."""
    if not body.startswith(NPY_MAGIC):
        raise BadRequest(
            "the body is not a .npy file (it must start with the bytes b'\\x93NUMPY'); save with np.save"
        )
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise BadRequest(
                "object arrays are not accepted (they would need pickle); send a numeric array"
            ) from exc
        raise BadRequest(f"malformed .npy body: {exc}") from exc
    except (EOFError, OSError, TypeError, SyntaxError) as exc:
        raise BadRequest(f"malformed or truncated .npy body: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise BadRequest("the body is not a single .npy array")
    _check_plain_dtype(array, "the .npy array")
    return normalize_array(array)


def decode_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive by name, normalized.

    ``max_bytes`` bounds what the members unpack to (a compressed archive could otherwise expand far beyond
    the body limit); over it, :class:`PayloadTooLarge`.
    """
    if not body.startswith(NPZ_MAGIC):
        raise BadRequest("the body is not an .npz file; save with np.savez(f, name=array, ...)")
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
            if unpacked > max_bytes:
                raise PayloadTooLarge(
                    f"the .npz unpacks to {unpacked} bytes, more than the gateway's limit of {max_bytes}; "
                    "send fewer or smaller arrays, or raise --max-body-bytes"
                )
            arrays: dict[str, np.ndarray] = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise BadRequest(f".npz member {info.filename!r} is not a .npy array")
                name = info.filename[: -len(".npy")]
                try:
                    arrays[name] = decode_npy(archive.read(info))
                except BadRequest as exc:
                    raise BadRequest(f".npz member {name!r}: {exc}") from exc
            return arrays
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise BadRequest(f"malformed or truncated .npz body: {exc}") from exc


def encode_npy(array: np.ndarray) -> bytes:
    """The ``.npy`` file bytes of ``array``."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` of ``arrays`` (member ``NAME.npy`` per array, as ``np.savez`` writes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _mismatch(spec: TensorSpec, array: np.ndarray, reason: str) -> BadRequest:
    return BadRequest(
        f"input '{spec.name}' expects {spec.dtype} with shape {format_shape(spec.shape)}, "
        f"got {array.dtype.name} {format_shape(array.shape)} ({reason})"
    )


def check_inputs(model: ModelInfo, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate ``tensors`` against the model's inputs; return them normalized, in the model's input order."""
    expected = {s.name for s in model.inputs}
    for name in tensors:
        if name not in expected:
            raise BadRequest(f"unknown input '{name}'; the model takes {describe_inputs(model)}")
    for spec in model.inputs:
        if spec.name not in tensors:
            raise BadRequest(f"missing input '{spec.name}'; the model takes {describe_inputs(model)}")

    checked: dict[str, np.ndarray] = {}
    symbols: dict[str, tuple[int, str]] = {}
    batch: tuple[int, str] | None = None
    for spec in model.inputs:
        array = tensors[spec.name]
        if not isinstance(array, np.ndarray):
            raise BadRequest(f"input '{spec.name}' is not an array")
        array = normalize_array(array)
        if array.dtype != spec.numpy_dtype:
            raise _mismatch(spec, array, "wrong element type; no cast is made, convert it before sending")
        if array.ndim != len(spec.shape):
            raise _mismatch(spec, array, f"rank {array.ndim}, expected {len(spec.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(want, int):
                if want != got:
                    raise _mismatch(spec, array, f"dimension {axis} is {got}, expected {want}")
                continue
            if axis == 0:
                if got == 0:
                    raise _mismatch(spec, array, "batch size 0; send at least one item")
                if batch is None:
                    batch = (got, spec.name)
                elif batch[0] != got:
                    raise BadRequest(
                        f"inconsistent batch size: input '{batch[1]}' has {batch[0]} items, "
                        f"input '{spec.name}' has {got}; every input needs the same leading dimension"
                    )
            if want != "?":
                seen = symbols.setdefault(want, (got, spec.name))
                if seen[0] != got:
                    raise BadRequest(
                        f"dimension '{want}' is {seen[0]} in input '{seen[1]}' but {got} in input "
                        f"'{spec.name}'; it must have one size across the inputs"
                    )
        checked[spec.name] = array
    return checked


def decode_input_body(model: ModelInfo, body: bytes, max_bytes: int) -> tuple[dict[str, np.ndarray], bool]:
    """The named arrays of a ``POST /input`` body (.npy for one-input models, or .npz), and whether it was
    an .npz (then every output is answered, as an .npz). Not yet checked against the model's specs."""
    if body.startswith(NPZ_MAGIC):
        return decode_npz(body, max_bytes), True
    if body.startswith(NPY_MAGIC):
        if len(model.inputs) != 1:
            raise BadRequest(
                f"this model takes {len(model.inputs)} inputs ({describe_inputs(model)}); "
                "send an .npz with one array per input name (np.savez(f, name=array, ...)) or use "
                f"POST /v2/models/{model.name}/infer"
            )
        return {model.inputs[0].name: decode_npy(body)}, False
    hint = ""
    if body.lstrip()[:1] in (b"{", b"["):
        hint = (
            " (it looks like JSON: Open Inference Protocol requests go to "
            f"POST /v2/models/{model.name}/infer, or to POST /v1/requests with "
            "Content-Type: application/json)"
        )
    raise BadRequest(
        "the body is neither a .npy nor an .npz file; send the bytes np.save (or np.savez) writes" + hint
    )
