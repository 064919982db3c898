"""The binary frame: round trips of every kind of tensor, and strict rejection of malformed bytes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from layerline.errors import ProtocolError
from layerline.runtime.framing import (
    ALLOWED_DTYPES,
    MAGIC,
    PREFIX,
    PREFIX_SIZE,
    ErrorInfo,
    Frame,
    Kind,
    StageStatus,
    TraceEntry,
    decode,
    encode,
)


def wire(frame: Frame, **kwargs) -> bytes:
    return b"".join(bytes(part) for part in encode(frame, **kwargs))


def raw_frame(meta: dict | bytes, payload: bytes = b"", **prefix) -> bytes:
    """Hand-built frame bytes, so that each field can be made wrong on its own."""
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    fields = {
        "magic": MAGIC,
        "version": 1,
        "kind": 1,
        "flags": 0,
        "rid": 1,
        "meta_len": len(meta_bytes),
        "reserved": 0,
        "payload_len": len(payload),
    }
    fields.update(prefix)
    return PREFIX.pack(*fields.values()) + meta_bytes + payload


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_every_allowed_dtype_round_trips(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 5)) * 50).astype(dtype)
    frame = decode(wire(Frame(Kind.DATA, 9, {"t": arr})))
    assert frame.tensors["t"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(frame.tensors["t"], arr)


def test_multiple_tensors_zero_d_empty_and_metadata_round_trip():
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "mask": np.array([True, False, True]),
        "strided": np.arange(20.0)[::3],  # not contiguous: sent as a contiguous copy
        "big_endian": np.arange(4, dtype=">i4"),
    }
    frame = Frame(
        Kind.DATA,
        (1 << 64) - 1,
        tensors,
        budget_ms=123.25,
        trace=(TraceEntry(0, 0.5, 1.0, 2.5), TraceEntry(1, 0.1, 0.2, 0.3)),
        statuses=(StageStatus(0, True, "ok"),),
    )
    got = decode(wire(frame))
    assert (got.kind, got.request_id, got.budget_ms) == (Kind.DATA, (1 << 64) - 1, 123.25)
    assert got.trace == frame.trace and got.statuses == frame.statuses
    assert list(got.tensors) == list(tensors)
    for name, arr in tensors.items():
        assert got.tensors[name].shape == arr.shape
        assert got.tensors[name].dtype.name == arr.dtype.name
        np.testing.assert_array_equal(got.tensors[name], arr)
    assert got.tensors["scalar"].ndim == 0
    assert all(t.flags.aligned and t.flags.c_contiguous for t in got.tensors.values())


def test_error_and_ping_frames_round_trip():
    err = decode(wire(Frame(Kind.ERROR, 3, error=ErrorInfo(2, "compute", "boom"))))
    assert err.kind is Kind.ERROR and err.error == ErrorInfo(2, "compute", "boom") and not err.tensors
    ping = decode(
        wire(Frame(Kind.PING, 4, budget_ms=-5.0, statuses=(StageStatus(0, True), StageStatus(1, False, "x"))))
    )
    assert (
        ping.kind is Kind.PING
        and ping.budget_ms == -5.0
        and [s.ready for s in ping.statuses] == [True, False]
    )


def test_big_tensor_is_not_copied_on_encode_and_round_trips():
    arr = np.random.default_rng(1).standard_normal(3_200_000).astype(np.float32)  # 12.8 MB
    parts = encode(Frame(Kind.DATA, 1, {"big": arr}))
    assert any(isinstance(p, memoryview) and np.shares_memory(np.asarray(p), arr) for p in parts)
    got = decode(b"".join(bytes(p) for p in parts))
    np.testing.assert_array_equal(got.tensors["big"], arr)


def test_tensor_buffers_are_64_byte_aligned_in_the_payload():
    frame = Frame(Kind.DATA, 1, {"a": np.ones(3, np.int8), "b": np.ones(5, np.float64)})
    parts = encode(frame)
    header = bytes(parts[0])
    meta = json.loads(header[PREFIX_SIZE:])
    assert [t["nbytes"] for t in meta["tensors"]] == [3, 40]
    assert struct.unpack_from("<Q", header, 24)[0] == 64 + 40


def test_encode_rejects_object_arrays_and_oversize_frames():
    with pytest.raises(ProtocolError, match="object"):
        encode(Frame(Kind.DATA, 1, {"o": np.array([{}, None], dtype=object)}))
    with pytest.raises(ProtocolError, match=r"dtype 'str\d+'"):
        encode(Frame(Kind.DATA, 1, {"s": np.array(["a"])}))
    with pytest.raises(ProtocolError, match="max_frame_bytes=2000"):
        encode(Frame(Kind.DATA, 1, {"a": np.zeros(1000, np.float32)}), max_frame_bytes=2000)


GOOD_META = {"tensors": [{"name": "t", "dtype": "float32", "shape": [2], "nbytes": 8}]}
GOOD_PAYLOAD = np.array([1.0, 2.0], np.float32).tobytes()


def test_hand_built_frame_is_valid():
    frame = decode(raw_frame(GOOD_META, GOOD_PAYLOAD))
    np.testing.assert_array_equal(frame.tensors["t"], [1.0, 2.0])


def _tensor(**changes):
    desc = dict(GOOD_META["tensors"][0], **changes)
    return {"tensors": [desc]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (raw_frame(GOOD_META, GOOD_PAYLOAD, magic=b"HTTP"), "magic"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD, version=2), "version 2"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD, kind=99), "kind 99"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD, flags=4), "flags"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD, reserved=1), "reserved"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD)[:20], "prefix"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD)[:-1], "announces"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD, payload_len=1 << 40), "max_frame_bytes"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD, meta_len=(1 << 20) + 1), "metadata of"),
        (raw_frame(b"{not json", GOOD_PAYLOAD), "JSON"),
        (raw_frame(b"\xff\xfe", GOOD_PAYLOAD), "UTF-8"),
        (raw_frame(b"[1, 2]", GOOD_PAYLOAD), "JSON object"),
        (raw_frame(_tensor(dtype="object"), GOOD_PAYLOAD), "dtype 'object'"),
        (raw_frame(_tensor(dtype="O"), GOOD_PAYLOAD), "dtype 'O'"),
        (raw_frame(_tensor(dtype="float128"), GOOD_PAYLOAD), "float128"),
        (raw_frame(_tensor(shape=[3]), GOOD_PAYLOAD), "nbytes 8 does not match"),
        (raw_frame(_tensor(shape=[-2]), GOOD_PAYLOAD), "invalid shape"),
        (raw_frame(_tensor(shape="2"), GOOD_PAYLOAD), "invalid shape"),
        (raw_frame(_tensor(shape=[2.0]), GOOD_PAYLOAD), "invalid shape"),
        (raw_frame(_tensor(nbytes=4), GOOD_PAYLOAD[:4]), "nbytes 4 does not match"),
        (raw_frame(_tensor(nbytes="8"), GOOD_PAYLOAD), "integer"),
        (raw_frame(_tensor(name=""), GOOD_PAYLOAD), "no valid name"),
        (raw_frame(GOOD_META, GOOD_PAYLOAD + b"\0" * 8), "payload is 16 bytes"),
        (raw_frame({"tensors": GOOD_META["tensors"] * 2}, GOOD_PAYLOAD * 2), "appears twice"),
        (raw_frame({"tensors": {}}, b""), "must be a list"),
        (raw_frame({"budget_ms": "soon"}), "budget_ms"),
        (raw_frame(b'{"budget_ms": NaN}'), "budget_ms"),
        (raw_frame({"error": {"stage": 1, "code": "oops", "message": "m"}}), "error code 'oops'"),
        (
            raw_frame({"error": {"stage": "1", "code": "compute", "message": "m"}}),
            "'stage' must be an integer",
        ),
        (raw_frame({"trace": [{"stage": 0, "recv_ms": 1, "queue_ms": None, "compute_ms": 1}]}), "queue_ms"),
        (raw_frame({"statuses": [{"stage": 0, "ready": "yes"}]}), "'ready' must be a boolean"),
    ],
)
def test_decode_rejects_malformed_frames(data, message):
    with pytest.raises(ProtocolError, match=message):
        decode(data)


def test_decode_honours_a_smaller_max_frame_size():
    data = wire(Frame(Kind.DATA, 1, {"a": np.zeros(1000, np.float32)}))
    assert decode(data).tensors["a"].shape == (1000,)
    with pytest.raises(ProtocolError, match="max_frame_bytes=1024"):
        decode(data, max_frame_bytes=1024)
