"""The binary frame that carries requests, errors and health probes between the gateway and the stages.

Layout (all integers little-endian; byte-by-byte description in ``docs/protocol.md``)::

    prefix   32 bytes   magic b"LLF1", version, kind, flags, request id, meta length, reserved, payload length
    meta     N bytes    UTF-8 JSON object: budget, tensor descriptors, trace, error, statuses
    payload  M bytes    the raw tensor buffers, each starting at a multiple of 64 bytes of the payload

Decoding is strict: anything that is not a valid frame raises :class:`~layerline.errors.ProtocolError`
naming the problem. Only numeric and bool dtypes are allowed; nothing is ever evaluated or unpickled.
This module needs only numpy and the standard library (the stage worker image has nothing else).

[Note: budgets, not deadlines] The meta carries the *remaining* time budget in milliseconds, never an
absolute time: the clocks of two devices differ. Each hop computes its own deadline as the time the
frame's first byte arrived plus the budget, and passes on what is left of it.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerline.errors import ProtocolError

__all__ = [
    "ALIGNMENT",
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAGIC",
    "MAX_META_BYTES",
    "PREFIX",
    "PREFIX_SIZE",
    "VERSION",
    "ErrorInfo",
    "Frame",
    "FrameMeta",
    "Kind",
    "Prefix",
    "StageStatus",
    "TraceEntry",
    "decode",
    "decode_meta",
    "decode_prefix",
    "encode",
    "frame_from_parts",
    "wire_dtype",
]

MAGIC = b"LLF1"
VERSION = 1
#: magic, version, kind, flags, request id, meta length, reserved (0), payload length.
PREFIX = struct.Struct("<4sBBHQIIQ")
PREFIX_SIZE = PREFIX.size
#: Every tensor buffer starts at a multiple of this many bytes from the start of the payload.
ALIGNMENT = 64
MAX_META_BYTES = 1 << 20
DEFAULT_MAX_FRAME_BYTES = 1 << 30
#: Element types a frame may carry (numpy names, always little-endian on the wire).
ALLOWED_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
_MAX_RANK = 32
# numpy's ``dtype.name`` is computed in Python on every access; look names and dtypes up instead.
_NAMES: dict[np.dtype, str] = {np.dtype(n): n for n in ALLOWED_DTYPES}
_DTYPES: dict[str, np.dtype] = {n: np.dtype(n) for n in ALLOWED_DTYPES}
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_PADDING = bytes(64)
_ERROR_CODES = frozenset({"compute", "bad_request", "unavailable", "deadline", "protocol"})


class Kind(enum.IntEnum):
    """What a frame is. DATA and PING travel downstream; ERROR and LINK travel back upstream."""

    DATA = 1  # a request's tensors, or a result when it reaches the gateway
    ERROR = 2  # a request failed at ``error.stage``; travels back to the gateway
    PING = 3  # health probe; each stage appends its status
    HELLO = 4  # first frame on a new connection: who is connecting (``statuses[0]``)
    LINK = 5  # a stage's downstream connection went down or came back (``statuses[0]``)


@dataclass(frozen=True)
class TraceEntry:
    """Where a request spent its time in one stage, in milliseconds of that stage's clock.

    ``recv_ms``: first byte → last byte of the incoming frame (the upstream's transfer, as seen here);
    ``queue_ms``: frame complete → compute started; ``compute_ms``: the onnxruntime run.
    """

    stage: int
    recv_ms: float
    queue_ms: float
    compute_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "recv_ms": round(self.recv_ms, 4),
            "queue_ms": round(self.queue_ms, 4),
            "compute_ms": round(self.compute_ms, 4),
        }

    @classmethod
    def from_json(cls, data: Any) -> TraceEntry:
        d = _obj(data, "trace entry")
        return cls(
            _int(d, "stage", "trace entry"),
            _num(d, "recv_ms", "trace entry"),
            _num(d, "queue_ms", "trace entry"),
            _num(d, "compute_ms", "trace entry"),
        )


@dataclass(frozen=True)
class ErrorInfo:
    """Why a request failed: the stage, a code (compute, bad_request, unavailable, deadline, protocol)."""

    stage: int
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "code": self.code, "message": self.message}

    @classmethod
    def from_json(cls, data: Any) -> ErrorInfo:
        d = _obj(data, "error")
        code = _str(d, "code", "error")
        if code not in _ERROR_CODES:
            raise ProtocolError(f"frame error code {code!r} is not one of {sorted(_ERROR_CODES)}")
        return cls(_int(d, "stage", "error"), code, _str(d, "message", "error"))


@dataclass(frozen=True)
class StageStatus:
    """One stage's answer to a health probe; also the identity in HELLO and the link state in LINK."""

    stage: int
    ready: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "ready": self.ready, "detail": self.detail}

    @classmethod
    def from_json(cls, data: Any) -> StageStatus:
        d = _obj(data, "status")
        ready = d.get("ready")
        if not isinstance(ready, bool):
            raise ProtocolError(f"frame status field 'ready' must be a boolean, got {ready!r}")
        return cls(_int(d, "stage", "status"), ready, _str(d, "detail", "status"))


@dataclass(frozen=True)
class Frame:
    """One message. ``tensors`` keep their order on the wire; ``budget_ms`` is None for no deadline."""

    kind: Kind
    request_id: int = 0
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    budget_ms: float | None = None
    trace: tuple[TraceEntry, ...] = ()
    error: ErrorInfo | None = None
    statuses: tuple[StageStatus, ...] = ()


@dataclass(frozen=True)
class Prefix:
    """The decoded fixed-size prefix."""

    kind: Kind
    flags: int
    request_id: int
    meta_len: int
    payload_len: int


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def wire_dtype(dtype: np.dtype) -> str | None:
    """The wire name of ``dtype`` (either byte order), or None when frames cannot carry it."""
    name = _NAMES.get(dtype)
    if name is None and dtype.byteorder == ">":
        name = _NAMES.get(dtype.newbyteorder("<"))
    return name


def _wire_array(name: str, value: Any) -> tuple[np.ndarray, str]:
    arr = value if type(value) is np.ndarray else np.asarray(value)
    wire = _NAMES.get(arr.dtype)
    if wire is None:
        wire = wire_dtype(arr.dtype)
        if wire is None:
            raise ProtocolError(
                f"tensor {name!r} has dtype {arr.dtype.name!r}, which frames cannot carry; "
                f"convert it to one of {sorted(ALLOWED_DTYPES)}"
            )
        arr = arr.astype(_DTYPES[wire])  # big-endian → little-endian
    if arr.ndim > _MAX_RANK:
        raise ProtocolError(f"tensor {name!r} has rank {arr.ndim}; frames allow at most {_MAX_RANK}")
    return (arr if arr.flags.c_contiguous else np.array(arr, order="C")), wire


def encode(
    frame: Frame, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, budget_ms: float | None = None
) -> list[bytes | memoryview]:
    """The frame as a list of buffers to write in order (the tensor data is not copied).

    ``budget_ms``, when given, replaces ``frame.budget_ms`` (the sender's remaining budget right now).
    """
    if not 0 <= frame.request_id < 1 << 64:
        raise ProtocolError(f"request id {frame.request_id} does not fit in an unsigned 64-bit integer")
    descriptors: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    offset = 0
    for name, value in frame.tensors.items():
        arr, wire = _wire_array(name, value)
        start = _align(offset)
        if start > offset:
            parts.append(_PADDING[: start - offset])
        nbytes = arr.nbytes
        if nbytes:
            parts.append(memoryview(arr.reshape(-1).view(np.uint8)))
        offset = start + nbytes
        descriptors.append({"name": name, "dtype": wire, "shape": list(arr.shape), "nbytes": nbytes})
    meta: dict[str, Any] = {}
    if budget_ms is None:
        budget_ms = frame.budget_ms
    if budget_ms is not None:
        if not math.isfinite(budget_ms):
            raise ProtocolError(f"budget_ms must be finite, got {budget_ms}")
        meta["budget_ms"] = round(float(budget_ms), 4)
    if descriptors:
        meta["tensors"] = descriptors
    if frame.trace:
        meta["trace"] = [t.to_json() for t in frame.trace]
    if frame.error is not None:
        meta["error"] = frame.error.to_json()
    if frame.statuses:
        meta["statuses"] = [s.to_json() for s in frame.statuses]
    meta_bytes = _ENCODER.encode(meta).encode() if meta else b""
    if len(meta_bytes) > MAX_META_BYTES:
        raise ProtocolError(f"frame metadata is {len(meta_bytes)} bytes, over the {MAX_META_BYTES} limit")
    total = PREFIX_SIZE + len(meta_bytes) + offset
    if total > max_frame_bytes:
        raise ProtocolError(
            f"frame of {total} bytes exceeds max_frame_bytes={max_frame_bytes}; raise the limit on "
            "every stage or send smaller tensors"
        )
    prefix = PREFIX.pack(MAGIC, VERSION, int(frame.kind), 0, frame.request_id, len(meta_bytes), 0, offset)
    return [prefix + meta_bytes, *parts]


def decode_prefix(
    data: bytes | bytearray | memoryview, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Prefix:
    """Validate and decode the 32-byte prefix."""
    if len(data) < PREFIX_SIZE:
        raise ProtocolError(f"frame prefix is {len(data)} bytes, expected {PREFIX_SIZE}")
    magic, version, kind, flags, rid, meta_len, reserved, payload_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r}): the peer is not a layerline stage"
        )
    if version != VERSION:
        raise ProtocolError(
            f"frame version {version} is not supported (this side speaks {VERSION}); "
            "run the same layerline version on every stage"
        )
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind}") from None
    if flags != 0 or reserved != 0:
        raise ProtocolError(f"frame flags/reserved must be 0 in version {VERSION}, got {flags}/{reserved}")
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"frame metadata of {meta_len} bytes exceeds the {MAX_META_BYTES} byte limit")
    total = PREFIX_SIZE + meta_len + payload_len
    if total > max_frame_bytes:
        raise ProtocolError(
            f"frame of {total} bytes exceeds max_frame_bytes={max_frame_bytes}; "
            "raise max_frame_bytes on this stage if such tensors are expected"
        )
    return Prefix(kind, flags, rid, meta_len, payload_len)


def _obj(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(f"frame {what} must be a JSON object, got {type(data).__name__}")
    return data


def _int(d: dict[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"frame {what} field {key!r} must be an integer, got {v!r}")
    return v


def _num(d: dict[str, Any], key: str, what: str) -> float:
    v = d.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise ProtocolError(f"frame {what} field {key!r} must be a finite number, got {v!r}")
    return float(v)


def _str(d: dict[str, Any], key: str, what: str) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise ProtocolError(f"frame {what} field {key!r} must be a string, got {v!r}")
    return v


def _list(d: dict[str, Any], key: str) -> list[Any]:
    v = d.get(key, [])
    if not isinstance(v, list):
        raise ProtocolError(f"frame meta field {key!r} must be a list, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class FrameMeta:
    budget_ms: float | None
    tensors: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]  # name, dtype, shape, nbytes, offset
    trace: tuple[TraceEntry, ...]
    error: ErrorInfo | None
    statuses: tuple[StageStatus, ...]


def _descriptor(data: Any, names: set[str]) -> tuple[str, np.dtype, tuple[int, ...], int]:
    d = _obj(data, "tensor descriptor")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"tensor descriptor has no valid name: {d!r}")
    if name in names:
        raise ProtocolError(f"tensor {name!r} appears twice in one frame")
    dtype = d.get("dtype")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"tensor {name!r} has dtype {dtype!r}, not one of {sorted(ALLOWED_DTYPES)}")
    shape = d.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_RANK
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ProtocolError(f"tensor {name!r} has invalid shape {shape!r} (need a list of ints >= 0)")
    nbytes = _int(d, "nbytes", f"tensor {name!r}")
    np_dtype = _DTYPES[dtype]
    expected = math.prod(shape) * np_dtype.itemsize
    if nbytes != expected:
        raise ProtocolError(
            f"tensor {name!r}: nbytes {nbytes} does not match shape {shape} of {dtype} ({expected} bytes)"
        )
    return name, np_dtype, tuple(shape), nbytes


def decode_meta(prefix: Prefix, data: bytes | bytearray | memoryview) -> FrameMeta:
    """Parse and validate the JSON metadata against the prefix's payload length."""
    if prefix.meta_len == 0:
        meta: Any = {}
    else:
        try:
            meta = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"frame metadata is not valid UTF-8 JSON: {exc}") from None
    meta = _obj(meta, "metadata")
    budget = meta.get("budget_ms")
    if budget is not None:
        budget = _num(meta, "budget_ms", "metadata")
    names: set[str] = set()
    tensors = []
    offset = 0
    for raw in _list(meta, "tensors"):
        name, dtype, shape, nbytes = _descriptor(raw, names)
        names.add(name)
        start = _align(offset)
        tensors.append((name, dtype, shape, nbytes, start))
        offset = start + nbytes
    if offset != prefix.payload_len:
        raise ProtocolError(
            f"frame payload is {prefix.payload_len} bytes but its tensor descriptors need {offset}"
        )
    error = meta.get("error")
    return FrameMeta(
        budget,
        tuple(tensors),
        tuple(TraceEntry.from_json(t) for t in _list(meta, "trace")),
        None if error is None else ErrorInfo.from_json(error),
        tuple(StageStatus.from_json(s) for s in _list(meta, "statuses")),
    )


def frame_from_parts(
    prefix: Prefix, meta: FrameMeta, payload: bytes | bytearray | memoryview | np.ndarray
) -> Frame:
    """Build the frame; its tensors are views into ``payload`` (no copy unless it is misaligned)."""
    if isinstance(payload, np.ndarray):
        buf = payload  # allocated by the reader: aligned
    else:
        buf = np.frombuffer(payload, dtype=np.uint8)
        if buf.__array_interface__["data"][0] % 8:
            buf = buf.copy()  # unaligned (a frame decoded from the middle of a buffer): align it once
    if buf.nbytes != prefix.payload_len:
        raise ProtocolError(f"frame payload is {buf.nbytes} bytes, its prefix says {prefix.payload_len}")
    tensors = {}
    for name, dtype, shape, nbytes, start in meta.tensors:
        flat = buf[start : start + nbytes].view(dtype)
        tensors[name] = flat.reshape(shape)
    return Frame(
        prefix.kind, prefix.request_id, tensors, meta.budget_ms, meta.trace, meta.error, meta.statuses
    )


def decode(data: bytes | bytearray | memoryview, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Decode one whole frame held in ``data`` (which must hold exactly one frame)."""
    view = memoryview(data).cast("B")
    prefix = decode_prefix(view, max_frame_bytes)
    end_meta = PREFIX_SIZE + prefix.meta_len
    if len(view) != end_meta + prefix.payload_len:
        raise ProtocolError(
            f"buffer holds {len(view)} bytes but the frame prefix announces {end_meta + prefix.payload_len}"
        )
    meta = decode_meta(prefix, view[PREFIX_SIZE:end_meta])
    return frame_from_parts(prefix, meta, view[end_meta:])
