"""``POST /input`` over real HTTP: .npy and .npz in and out, every bad body followed by a good request."""

from __future__ import annotations

import http.client
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from layerline.serve.validation import decode_npy, decode_npz, encode_npy, encode_npz

OCTET = {"Content-Type": "application/octet-stream"}


def _x(batch: int = 2, dtype: Any = np.float32) -> np.ndarray:
    return (np.arange(batch * 8, dtype=np.float64).reshape(batch, 8) / 7 - 1).astype(dtype)


def _pair(batch: int = 2) -> dict[str, np.ndarray]:
    x = (np.arange(batch * 6, dtype=np.float32).reshape(batch, 6) - 3) / 5
    mask = (np.arange(batch * 6).reshape(batch, 6) % 3 != 0).astype(np.int64)
    return {"x": x, "mask": mask}


def _assert_serves(gw: Any, built: Any, http: Any) -> None:
    """A valid request right after a bad one still gets the right answer."""
    status, _, body = http(gw)("POST", "/input", encode_npy(_x(3)), OCTET)
    assert status == 200, body
    np.testing.assert_array_equal(decode_npy(body), built.reference({"input": _x(3)})["logits"])


def test_npy_round_trip_equals_onnxruntime(mlp_gw: Any, mlp: Any, http: Any) -> None:
    for batch in (1, 5):
        status, headers, body = http(mlp_gw)("POST", "/input", encode_npy(_x(batch)), OCTET)
        assert status == 200
        assert headers["content-type"] == "application/octet-stream"
        out = decode_npy(body)
        assert out.shape == (batch, 4) and out.dtype == np.float32
        np.testing.assert_array_equal(out, mlp.reference({"input": _x(batch)})["logits"])


def test_seed_style_np_save_body(mlp_gw: Any, mlp: Any, http: Any) -> None:
    """The body np.save writes (as the seed tool's client sends it), answered with np.load-able bytes."""
    buf = io.BytesIO()
    np.save(buf, _x(1))
    status, _, body = http(mlp_gw)("POST", "/input", buf.getvalue())
    assert status == 200
    result = np.load(io.BytesIO(body), allow_pickle=False)
    np.testing.assert_array_equal(result, mlp.reference({"input": _x(1)})["logits"])


def test_fortran_order_and_big_endian_are_accepted(mlp_gw: Any, mlp: Any, http: Any) -> None:
    a = np.asfortranarray(_x(4).astype(">f4"))
    status, _, body = http(mlp_gw)("POST", "/input", encode_npy(a), OCTET)
    assert status == 200, body
    np.testing.assert_array_equal(decode_npy(body), mlp.reference({"input": _x(4)})["logits"])


def test_npz_for_multi_input_model(pair_gw: Any, pair: Any, http: Any) -> None:
    status, _, body = http(pair_gw)("POST", "/input", encode_npz(_pair(3)), OCTET)
    assert status == 200, body
    out = decode_npz(body, 1 << 20)
    want = pair.reference(_pair(3))
    assert list(out) == ["y", "count"]
    np.testing.assert_array_equal(out["y"], want["y"])
    np.testing.assert_array_equal(out["count"], want["count"])
    # np.savez's own archives work too
    buf = io.BytesIO()
    np.savez(buf, **_pair(1))
    status, _, body = http(pair_gw)("POST", "/input", buf.getvalue(), OCTET)
    assert status == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(body))["count"], pair.reference(_pair(1))["count"])


def test_npz_for_single_input_model(mlp_gw: Any, mlp: Any, http: Any) -> None:
    status, _, body = http(mlp_gw)("POST", "/input", encode_npz({"input": _x(2)}), OCTET)
    assert status == 200
    np.testing.assert_array_equal(
        decode_npz(body, 1 << 20)["logits"], mlp.reference({"input": _x(2)})["logits"]
    )


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


BAD_BODIES = [
    ("empty", b"", "neither a .npy nor an .npz"),
    ("text", b"hello", "neither a .npy nor an .npz"),
    ("truncated npy", encode_npy(_x(2))[:-7], "malformed"),
    ("object array", _object_npy(), "object arrays are not accepted"),
    (
        "int64",
        encode_npy(_x(2, np.int64)),
        "input 'input' expects float32 with shape [batch, 8], got int64 [2, 8]",
    ),
    ("float64", encode_npy(_x(2, np.float64)), "got float64 [2, 8] (wrong element type"),
    ("rank", encode_npy(np.zeros(8, np.float32)), "(rank 1, expected 2)"),
    ("fixed dim", encode_npy(np.zeros((2, 7), np.float32)), "(dimension 1 is 7, expected 8)"),
    ("batch 0", encode_npy(np.zeros((0, 8), np.float32)), "batch size 0"),
    ("npz wrong name", encode_npz({"arr_0": _x(1)}), "unknown input 'arr_0'; the model takes 'input'"),
    ("truncated npz", encode_npz({"input": _x(2)})[:-40], "malformed or truncated .npz"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_get_400_then_service_continues(
    case: str, body: bytes, message: str, mlp_gw: Any, mlp: Any, http: Any
) -> None:
    status, headers, data = http(mlp_gw)("POST", "/input", body, OCTET)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert message in json.loads(data)["error"]
    _assert_serves(mlp_gw, mlp, http)


BAD_PAIRS = [
    ("npy for 2 inputs", encode_npy(np.zeros((1, 6), np.float32)), "this model takes 2 inputs ('x' (float32"),
    ("missing mask", encode_npz({"x": _pair()["x"]}), "missing input 'mask'"),
    ("batch mismatch", encode_npz({"x": _pair(2)["x"], "mask": _pair(3)["mask"]}), "inconsistent batch size"),
    (
        "mask float",
        encode_npz({**_pair(), "mask": _pair()["mask"].astype(np.float32)}),
        "input 'mask' expects int64",
    ),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_PAIRS, ids=[c[0] for c in BAD_PAIRS])
def test_bad_multi_input_bodies(
    case: str, body: bytes, message: str, pair_gw: Any, pair: Any, http: Any
) -> None:
    status, _, data = http(pair_gw)("POST", "/input", body, OCTET)
    assert status == 400
    assert message in json.loads(data)["error"]
    status, _, data = http(pair_gw)("POST", "/input", encode_npz(_pair(2)), OCTET)
    assert status == 200
    np.testing.assert_array_equal(decode_npz(data, 1 << 20)["y"], pair.reference(_pair(2))["y"])


def _raw_post(port: int, body: bytes | Iterator[bytes], chunked: bool) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        headers = dict(OCTET)
        if chunked:
            conn.request("POST", "/input", body=body, headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/input", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_body_over_limit_413_by_content_length(mlp_gw: Any, mlp: Any, http: Any) -> None:
    big = encode_npy(np.zeros((3000, 8), np.float32))  # 96 KB > the 64 KiB limit of these gateways
    status, error = _raw_post(mlp_gw.port, big, chunked=False)
    assert status == 413
    assert "larger than the gateway's limit of 65536 bytes" in error["error"]
    _assert_serves(mlp_gw, mlp, http)


def test_body_over_limit_413_while_streaming(mlp_gw: Any, mlp: Any, http: Any) -> None:
    big = encode_npy(np.zeros((3000, 8), np.float32))
    chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))  # no Content-Length: chunked encoding
    status, error = _raw_post(mlp_gw.port, chunks, chunked=True)
    assert status == 413
    assert "--max-body-bytes" in error["error"]
    _assert_serves(mlp_gw, mlp, http)


def test_compressed_npz_expanding_past_limit_413(mlp_gw: Any, mlp: Any, http: Any) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, input=np.zeros((20000, 8), np.float32))
    assert len(buf.getvalue()) < 64 * 1024
    status, _, data = http(mlp_gw)("POST", "/input", buf.getvalue(), OCTET)
    assert status == 413
    assert "unpacks to" in json.loads(data)["error"]
    _assert_serves(mlp_gw, mlp, http)


def test_wrong_method_and_unknown_path_answer_json(mlp_gw: Any, http: Any) -> None:
    status, headers, data = http(mlp_gw)("GET", "/input")
    assert status == 405 and "POST" in headers["allow"]
    assert "GET /input" in json.loads(data)["error"]
    status, _, data = http(mlp_gw)("GET", "/nope")
    assert status == 404 and "error" in json.loads(data)
