"""Table-driven tests of the pure request checks and codecs: validation, OIP messages, model info."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from layerline.errors import BadRequest, FormatError
from layerline.serve import oip
from layerline.serve.model_info import ModelInfo, numpy_dtype_for, oip_datatype
from layerline.serve.validation import (
    PayloadTooLarge,
    check_inputs,
    decode_npy,
    decode_npz,
    encode_npy,
    encode_npz,
)
from layerline.tensors import TensorSpec

PAIR = ModelInfo(
    "pair",
    inputs=(TensorSpec("x", "float32", ("batch", 6)), TensorSpec("mask", "int64", ("batch", 6))),
    outputs=(TensorSpec("y", "float32", ("batch", 3)), TensorSpec("count", "int64", ("batch", 1))),
)
IMAGE = ModelInfo(
    "img",
    inputs=(TensorSpec("input", "float32", ("batch", 3, 224, 224)),),
    outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
)
SEQ = ModelInfo(
    "seq",
    inputs=(TensorSpec("tokens", "int64", ("batch", "seq")), TensorSpec("pos", "int64", ("batch", "seq"))),
    outputs=(TensorSpec("out", "float32", ("batch", "seq")),),
)


def x(b: int = 2, dtype: Any = np.float32) -> np.ndarray:
    return np.arange(b * 6, dtype=dtype).reshape(b, 6)


def mask(b: int = 2) -> np.ndarray:
    return np.ones((b, 6), np.int64)


# -- check_inputs ------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("missing", PAIR, {"x": x()}, "missing input 'mask'; the model takes 'x' (float32 [batch, 6])"),
    ("unknown", PAIR, {"x": x(), "mask": mask(), "extra": x()}, "unknown input 'extra'"),
    (
        "dtype",
        IMAGE,
        {"input": np.zeros((1, 3, 64, 64), np.int64)},
        "input 'input' expects float32 with shape [batch, 3, 224, 224], got int64 [1, 3, 64, 64] (wrong",
    ),
    (
        "no float64 cast",
        PAIR,
        {"x": x(dtype=np.float64), "mask": mask()},
        "got float64 [2, 6] (wrong element",
    ),
    ("rank", PAIR, {"x": np.zeros(6, np.float32), "mask": mask()}, "got float32 [6] (rank 1, expected 2)"),
    ("fixed dim", PAIR, {"x": np.zeros((2, 5), np.float32), "mask": mask()}, "dimension 1 is 5, expected 6"),
    ("batch 0", PAIR, {"x": x(0), "mask": mask(0)}, "batch size 0"),
    ("batch mismatch", PAIR, {"x": x(2), "mask": mask(3)}, "input 'x' has 2 items, input 'mask' has 3"),
    (
        "symbolic dim mismatch",
        SEQ,
        {"tokens": np.zeros((1, 4), np.int64), "pos": np.zeros((1, 5), np.int64)},
        "dimension 'seq' is 4 in input 'tokens' but 5 in input 'pos'",
    ),
    ("not an array", PAIR, {"x": [[1.0] * 6], "mask": mask(1)}, "input 'x' is not an array"),
]


@pytest.mark.parametrize(("case", "model", "tensors", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_check_inputs_rejects(case: str, model: ModelInfo, tensors: dict, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_inputs(model, tensors)
    assert message in str(info.value)
    assert info.value.http_status == 400


def test_check_inputs_accepts_and_normalizes() -> None:
    fortran = np.asfortranarray(x(3))
    big = mask(3).astype(">i8")
    out = check_inputs(PAIR, {"mask": big, "x": fortran})
    assert list(out) == ["x", "mask"]  # the model's order
    assert out["x"].flags.c_contiguous and out["mask"].dtype.isnative
    np.testing.assert_array_equal(out["x"], x(3))
    np.testing.assert_array_equal(out["mask"], mask(3))
    seq = check_inputs(SEQ, {"tokens": np.zeros((2, 7), np.int64), "pos": np.zeros((2, 7), np.int64)})
    assert seq["pos"].shape == (2, 7)


# -- .npy / .npz ---------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))


def _npy_with_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([obj], dtype=object), allow_pickle=True)
    return buf.getvalue()


GOOD = encode_npy(np.arange(12, dtype=np.float32).reshape(3, 4))

BAD_NPY = [
    ("empty", b"", "not a .npy file"),
    ("not npy", b"hello world", "not a .npy file"),
    ("truncated data", GOOD[:-5], "malformed"),
    ("truncated header", GOOD[:20], "malformed"),
    ("garbage header", b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}   \n", "malformed"),
    ("object array", _npy_with_pickle({"a": 1}), "object arrays are not accepted"),
    ("strings", encode_npy(np.array(["a", "b"])), "only plain numeric and bool"),
    ("structured", encode_npy(np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")])), "only plain numeric"),
    ("complex", encode_npy(np.zeros(2, np.complex64)), "only plain numeric"),
    ("npz sent as npy", encode_npz({"a": np.zeros(2)}), "not a .npy file"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_NPY, ids=[c[0] for c in BAD_NPY])
def test_decode_npy_rejects(case: str, body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        decode_npy(body)


def test_decode_npy_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(BadRequest, match="object arrays"):
        decode_npy(_npy_with_pickle(_Trap(str(marker))))
    with pytest.raises(BadRequest):
        decode_npz(_npz_member("a", _npy_with_pickle(_Trap(str(marker)))), 1 << 20)
    assert not marker.exists()


def _npz_member(name: str, npy: bytes) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(f"{name}.npy", npy)
    return buf.getvalue()


def test_decode_npy_normalizes_fortran_and_big_endian() -> None:
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    out = decode_npy(encode_npy(np.asfortranarray(a)))
    assert out.dtype == np.float32 and out.dtype.isnative and out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)


def test_decode_npz() -> None:
    arrays = {"x": x(), "mask": mask()}
    out = decode_npz(encode_npz(arrays), 1 << 20)
    assert list(out) == ["x", "mask"]
    np.testing.assert_array_equal(out["mask"], mask())
    # np.savez's own files are read too
    buf = io.BytesIO()
    np.savez(buf, x=x())
    np.testing.assert_array_equal(decode_npz(buf.getvalue(), 1 << 20)["x"], x())


def test_decode_npz_rejects() -> None:
    import zipfile

    for body, message in [
        (b"PK\x03\x04garbage", "malformed or truncated .npz"),
        (encode_npz({"a": np.zeros(100)})[:-30], "malformed or truncated .npz"),
        (b"\x93NUMPY", "not an .npz"),
        (_npz_member("a", b"not an array"), ".npz member 'a': the body is not a .npy"),
    ]:
        with pytest.raises(BadRequest, match=re.escape(message)):
            decode_npz(body, 1 << 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("readme.txt", b"hi")
    with pytest.raises(BadRequest, match=r"'readme\.txt' is not a \.npy"):
        decode_npz(buf.getvalue(), 1 << 20)


def test_decode_npz_bounds_what_it_unpacks() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros(1 << 20, np.float32))  # 4 MiB of zeros, a few KiB compressed
    body = buf.getvalue()
    assert len(body) < 64 * 1024
    with pytest.raises(PayloadTooLarge, match="unpacks to") as info:
        decode_npz(body, 64 * 1024)
    assert info.value.http_status == 413


# -- OIP messages ----------------------------------------------------------------------------------------


def _req(*inputs: dict, **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


X_JSON = {"name": "x", "shape": [1, 6], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5]}
M_JSON = {"name": "mask", "shape": [1, 6], "datatype": "INT64", "data": [1, 1, 1, 0, 0, 0]}

BAD_OIP: list[tuple[str, bytes, Any, str]] = [
    ("not json", b"{nope", None, "not valid JSON"),
    ("json list", b"[1, 2]", None, "must be a JSON object"),
    ("no inputs", b"{}", None, "non-empty 'inputs' list"),
    ("empty inputs", _req(), None, "non-empty 'inputs' list"),
    ("unnamed", _req({"shape": [1], "datatype": "FP32", "data": [1]}), None, "string 'name'"),
    ("shape not list", _req({**X_JSON, "shape": "1x6"}), None, "'shape' must be a list of integers"),
    ("negative dim", _req({**X_JSON, "shape": [-1, 6]}), None, "negative dimension"),
    (
        "bad datatype",
        _req({**X_JSON, "datatype": "FLOAT32"}),
        None,
        "unknown datatype 'FLOAT32'; use one of BOOL",
    ),
    ("BYTES", _req({**X_JSON, "datatype": "BYTES"}), None, "unknown datatype 'BYTES'"),
    (
        "data too short",
        _req({**X_JSON, "data": [1, 2, 3]}),
        None,
        "'data' has 3 values but shape [1, 6] needs 6",
    ),
    ("data too long", _req({**X_JSON, "data": list(range(7))}), None, "has 7 values"),
    ("ragged", _req({**X_JSON, "data": [[1, 2, 3], [4, 5]]}), None, "not a flat or evenly nested list"),
    ("floats for INT64", _req(X_JSON, {**M_JSON, "data": [1.5, 1, 1, 0, 0, 0]}), None, "holds floats but"),
    ("bools for FP32", _req({**X_JSON, "data": [True] * 6}), None, "holds booleans but the datatype is FP32"),
    ("strings", _req({**X_JSON, "data": ["1"] * 6}), None, "holds strings"),
    ("null", _req({**X_JSON, "data": [None] * 6}), None, "not numbers"),
    (
        "out of range",
        _req({**M_JSON, "datatype": "UINT8", "data": [256, 0, 0, 0, 0, 0]}),
        None,
        "out of UINT8",
    ),
    ("no data", _req({"name": "x", "shape": [1, 6], "datatype": "FP32"}), None, "neither 'data' nor"),
    ("twice", _req(X_JSON, X_JSON), None, "input 'x' is given twice"),
    (
        "unknown output",
        _req(X_JSON, M_JSON, outputs=[{"name": "zz"}]),
        None,
        "unknown output 'zz'; the model's",
    ),
    ("output twice", _req(X_JSON, outputs=[{"name": "y"}, {"name": "y"}]), None, "requested twice"),
    ("id not string", _req(X_JSON, id=5), None, "'id' must be a string"),
    ("header not int", _req(X_JSON), "abc", "must be an integer"),
    ("header too long", _req(X_JSON), "100000", "but the body has only"),
]


@pytest.mark.parametrize(("case", "body", "header", "message"), BAD_OIP, ids=[c[0] for c in BAD_OIP])
def test_parse_infer_request_rejects(case: str, body: bytes, header: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        oip.parse_infer_request(body, header, PAIR)
    assert message in str(info.value)


def _binary(entries: list[dict], blobs: list[bytes]) -> tuple[bytes, int]:
    header = json.dumps({"inputs": entries}).encode()
    return header + b"".join(blobs), len(header)


XB = np.arange(6, dtype="<f4").reshape(1, 6).tobytes()
MB = np.ones((1, 6), "<i8").tobytes()
XE = {"name": "x", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}
ME = {"name": "mask", "shape": [1, 6], "datatype": "INT64", "parameters": {"binary_data_size": 48}}

BAD_BINARY = [
    (
        "size disagrees with shape",
        [{**XE, "parameters": {"binary_data_size": 20}}],
        [XB[:20]],
        "takes 24 bytes",
    ),
    (
        "extra bytes",
        [XE, ME],
        [XB, MB, b"xx"],
        "carries 74 bytes of binary data but the inputs' binary_data_size add up to 72",
    ),
    ("missing bytes", [XE, ME], [XB, MB[:40]], "binary data ends after 64 bytes"),
    ("size not int", [{**XE, "parameters": {"binary_data_size": "24"}}], [XB], "non-negative integer"),
    ("data and binary", [{**XE, "data": [0] * 6}], [XB], "has both 'data' and a binary_data_size"),
]


@pytest.mark.parametrize(("case", "entries", "blobs", "message"), BAD_BINARY, ids=[c[0] for c in BAD_BINARY])
def test_parse_binary_rejects(case: str, entries: list, blobs: list, message: str) -> None:
    body, n = _binary(entries, blobs)
    with pytest.raises(BadRequest, match=re.escape(message)):
        oip.parse_infer_request(body, str(n), PAIR)


def test_parse_binary_and_json_mixed() -> None:
    header = json.dumps({"inputs": [XE, M_JSON], "id": "r1", "parameters": {"binary_data_output": True}})
    body = header.encode() + XB
    req = oip.parse_infer_request(body, len(header), PAIR)
    np.testing.assert_array_equal(req.inputs["x"], np.arange(6, dtype=np.float32).reshape(1, 6))
    np.testing.assert_array_equal(req.inputs["mask"], np.array([[1, 1, 1, 0, 0, 0]]))
    assert req.id == "r1"
    assert req.outputs == (oip.RequestedOutput("y", True), oip.RequestedOutput("count", True))


def test_parse_nested_json_and_output_choice() -> None:
    nested = {**X_JSON, "shape": [2, 6], "data": [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]}
    body = _req(nested, outputs=[{"name": "count", "parameters": {"binary_data": True}}, {"name": "y"}])
    req = oip.parse_infer_request(body, None, PAIR)
    np.testing.assert_array_equal(req.inputs["x"], x(2))
    assert req.outputs == (oip.RequestedOutput("count", True), oip.RequestedOutput("y", False))


def test_infer_messages_round_trip() -> None:
    inputs = {"x": x(2), "mask": mask(2)}
    for binary in (True, False):
        body, n = oip.encode_infer_request(inputs, outputs=["y"], binary=binary, request_id="abc")
        assert (n is not None) == binary
        req = oip.parse_infer_request(body, n, PAIR)
        assert req.id == "abc" and [o.name for o in req.outputs] == ["y"]
        for name, value in inputs.items():
            np.testing.assert_array_equal(req.inputs[name], value)
            assert req.inputs[name].dtype == value.dtype
        outputs = {
            "y": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3) / 3,
            "count": np.ones((2, 1), np.int64),
        }
        payload, m = oip.encode_infer_response(PAIR, outputs, req)
        decoded = oip.decode_infer_response(payload, m)
        assert list(decoded) == ["y"]
        np.testing.assert_array_equal(decoded["y"], outputs["y"])  # exact, JSON included
        assert decoded["y"].dtype == np.float32
        header = json.loads(payload[:m] if m else payload)
        assert header["id"] == "abc" and header["model_name"] == "pair"


# -- model info ----------------------------------------------------------------------------------------


def test_model_info_metadata_and_json() -> None:
    meta = PAIR.metadata()
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 6]},
        {"name": "mask", "datatype": "INT64", "shape": [-1, 6]},
    ]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime"
    assert ModelInfo.from_json(json.loads(json.dumps(PAIR.to_json()))) == PAIR
    with pytest.raises(FormatError, match="format_version 99"):
        ModelInfo.from_json({**PAIR.to_json(), "format_version": 99})
    with pytest.raises(FormatError, match="malformed"):
        ModelInfo.from_json({"format_version": 1, "name": "a"})
    assert ModelInfo.from_metadata(meta) == ModelInfo(
        "pair",
        inputs=(TensorSpec("x", "float32", ("?", 6)), TensorSpec("mask", "int64", ("?", 6))),
        outputs=(TensorSpec("y", "float32", ("?", 3)), TensorSpec("count", "int64", ("?", 1))),
    )
    with pytest.raises(FormatError, match="malformed tensor"):
        ModelInfo.from_metadata({**meta, "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]})
    with pytest.raises(ValueError, match="no '/'"):
        ModelInfo("a/b", PAIR.inputs, PAIR.outputs)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        ("float32", "FP32"),
        ("float16", "FP16"),
        ("float64", "FP64"),
        ("int64", "INT64"),
        ("int8", "INT8"),
        ("uint8", "UINT8"),
        ("bool", "BOOL"),
        ("int32", "INT32"),
    ],
)
def test_datatype_names(dtype: str, name: str) -> None:
    assert oip_datatype(dtype) == name
    assert numpy_dtype_for(name) == np.dtype(dtype)


def test_datatype_errors() -> None:
    with pytest.raises(ValueError, match="complex64 has no Open Inference Protocol datatype"):
        oip_datatype("complex64")
    with pytest.raises(ValueError, match="unknown datatype 'fp32'"):
        numpy_dtype_for("fp32")


def test_model_info_from_onnx(mlp: Any, pair: Any) -> None:
    assert mlp.info.inputs == (TensorSpec("input", "float32", ("batch", 8)),)
    assert mlp.info.outputs == (TensorSpec("logits", "float32", ("batch", 4)),)
    assert [s.name for s in pair.info.inputs] == ["x", "mask"]  # the weights are not inputs
    assert pair.info.output("count") == TensorSpec("count", "int64", ("batch", 1))
