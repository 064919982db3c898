"""The Open Inference Protocol v2 endpoints over real HTTP: metadata, health, JSON and binary inference."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import layerline

INFER = "/v2/models/pair/infer"


def _pair(batch: int = 2) -> dict[str, np.ndarray]:
    x = (np.arange(batch * 6, dtype=np.float32).reshape(batch, 6) - 3) / 7
    mask = (np.arange(batch * 6).reshape(batch, 6) % 4 != 1).astype(np.int64)
    return {"x": x, "mask": mask}


def _json_inputs(feeds: dict[str, np.ndarray], nested: bool = False) -> list[dict]:
    names = {"float32": "FP32", "int64": "INT64"}
    return [
        {
            "name": name,
            "shape": list(a.shape),
            "datatype": names[a.dtype.name],
            "data": a.tolist() if nested else a.ravel().tolist(),
        }
        for name, a in feeds.items()
    ]


def test_server_metadata_and_liveness(pair_gw: Any, http: Any) -> None:
    status, meta = http(pair_gw).json("GET", "/v2")
    assert status == 200
    assert meta == {
        "name": "layerline",
        "version": layerline.__version__,
        "extensions": ["binary_tensor_data"],
    }
    status, live = http(pair_gw).json("GET", "/v2/health/live")
    assert status == 200 and live == {"live": True}


def test_readiness(pair_gw: Any, http: Any) -> None:
    status, ready = http(pair_gw).json("GET", "/v2/health/ready")
    assert status == 200 and ready["ready"] is True
    assert ready["stages"] == [{"stage": 0, "ready": True, "detail": "in-process"}]
    status, body = http(pair_gw).json("GET", "/v2/models/pair/ready")
    assert status == 200 and body["name"] == "pair" and body["ready"] is True
    status, body = http(pair_gw).json("GET", "/v2/models/pair/versions/1/ready")
    assert status == 200
    status, index = http(pair_gw).json("POST", "/v2/repository/index")
    assert index == [{"name": "pair", "version": "1", "state": "READY"}]


def test_model_metadata(pair_gw: Any, http: Any) -> None:
    status, meta = http(pair_gw).json("GET", "/v2/models/pair")
    assert status == 200
    assert meta == {
        "name": "pair",
        "versions": ["1"],
        "platform": "onnxruntime",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 6]},
            {"name": "mask", "datatype": "INT64", "shape": [-1, 6]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "count", "datatype": "INT64", "shape": [-1, 1]},
        ],
    }
    assert http(pair_gw).json("GET", "/v2/models/pair/versions/1")[1] == meta


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
        ("POST", "/v2/models/nope/infer"),
        ("GET", "/v2/models/pair/versions/7"),
        ("POST", "/v2/models/pair/versions/7/infer"),
    ],
)
def test_unknown_model_or_version_is_404(method: str, path: str, pair_gw: Any, http: Any) -> None:
    payload = {"inputs": _json_inputs(_pair(1))} if method == "POST" else None
    status, body = http(pair_gw).json(method, path, payload)
    assert status == 404
    assert set(body) == {"error"}
    assert "unknown" in body["error"] and "this gateway serves" in body["error"]


def test_json_infer_equals_onnxruntime(pair_gw: Any, pair: Any, http: Any) -> None:
    feeds = _pair(3)
    want = pair.reference(feeds)
    for nested in (False, True):
        payload = {"id": "req-7", "inputs": _json_inputs(feeds, nested), "parameters": {"ignored": 1}}
        status, body = http(pair_gw).json("POST", INFER, payload)
        assert status == 200, body
        assert body["id"] == "req-7" and body["model_name"] == "pair" and body["model_version"] == "1"
        out = {o["name"]: o for o in body["outputs"]}
        assert list(out) == ["y", "count"]
        assert out["y"]["datatype"] == "FP32" and out["y"]["shape"] == [3, 3]
        y = np.asarray(out["y"]["data"], dtype=np.float32).reshape(out["y"]["shape"])
        np.testing.assert_array_equal(y, want["y"])  # JSON floats carry float32 values exactly
        assert out["count"]["datatype"] == "INT64"
        np.testing.assert_array_equal(np.reshape(out["count"]["data"], (3, 1)), want["count"])
    status, _, data = http(pair_gw)("POST", "/v2/models/pair/versions/1/infer", json.dumps(payload).encode())
    assert status == 200 and json.loads(data)["id"] == "req-7"


def test_json_infer_output_subset(pair_gw: Any, pair: Any, http: Any) -> None:
    payload = {"inputs": _json_inputs(_pair(1)), "outputs": [{"name": "count"}]}
    status, body = http(pair_gw).json("POST", INFER, payload)
    assert status == 200
    assert [o["name"] for o in body["outputs"]] == ["count"] and "id" not in body
    assert body["outputs"][0]["data"] == pair.reference(_pair(1))["count"].ravel().tolist()


def _binary_request(feeds: dict[str, np.ndarray], extra: dict) -> tuple[bytes, dict[str, str]]:
    names = {"float32": "FP32", "int64": "INT64"}
    entries, blobs = [], []
    for name, a in feeds.items():
        blob = a.astype(a.dtype.newbyteorder("<")).tobytes()
        entries.append(
            {
                "name": name,
                "shape": list(a.shape),
                "datatype": names[a.dtype.name],
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    header = json.dumps({"inputs": entries, **extra}).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + b"".join(blobs), headers


def test_binary_infer_equals_onnxruntime(pair_gw: Any, pair: Any, http: Any) -> None:
    """Binary in, binary out, decoded by hand from the extension's layout (not by layerline's codec)."""
    feeds = _pair(4)
    want = pair.reference(feeds)
    body, headers = _binary_request(feeds, {"id": "b1", "parameters": {"binary_data_output": True}})
    status, resp_headers, data = http(pair_gw)("POST", INFER, body, headers)
    assert status == 200
    assert resp_headers["content-type"] == "application/octet-stream"
    n = int(resp_headers["inference-header-content-length"])
    header = json.loads(data[:n])
    assert header["id"] == "b1"
    y, count = header["outputs"]
    assert y["name"] == "y" and y["parameters"] == {"binary_data_size": 4 * 3 * 4} and "data" not in y
    assert count["name"] == "count" and count["parameters"] == {"binary_data_size": 4 * 1 * 8}
    got_y = np.frombuffer(data[n : n + 48], "<f4").reshape(4, 3)
    got_count = np.frombuffer(data[n + 48 :], "<i8").reshape(4, 1)
    np.testing.assert_array_equal(got_y, want["y"])
    np.testing.assert_array_equal(got_count, want["count"])


def test_binary_in_json_out_and_mixed_outputs(pair_gw: Any, pair: Any, http: Any) -> None:
    feeds = _pair(2)
    want = pair.reference(feeds)
    body, headers = _binary_request(feeds, {})
    status, resp_headers, data = http(pair_gw)("POST", INFER, body, headers)
    assert status == 200 and "inference-header-content-length" not in resp_headers
    assert json.loads(data)["outputs"][0]["data"] == want["y"].ravel().tolist()

    mixed = {"outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "count"}]}
    body, headers = _binary_request(feeds, mixed)
    status, resp_headers, data = http(pair_gw)("POST", INFER, body, headers)
    n = int(resp_headers["inference-header-content-length"])
    header = json.loads(data[:n])
    assert header["outputs"][1]["data"] == want["count"].ravel().tolist()
    np.testing.assert_array_equal(np.frombuffer(data[n:], "<f4").reshape(2, 3), want["y"])


X1 = {"name": "x", "shape": [1, 6], "datatype": "FP32", "data": [0.5] * 6}
MASK1 = {"name": "mask", "shape": [1, 6], "datatype": "INT64", "data": [1] * 6}

X1_BIN = {"name": "x", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 10}}

BAD_OIP = [
    ("not json", b"{", {}, "not valid JSON"),
    ("no inputs", b'{"id": "a"}', {}, "non-empty 'inputs' list"),
    ("bad datatype", {"inputs": [{**X1, "datatype": "float"}, MASK1]}, {}, "unknown datatype 'float'"),
    (
        "data vs shape",
        {"inputs": [{**X1, "data": [1.0] * 5}, MASK1]},
        {},
        "'data' has 5 values but shape [1, 6]",
    ),
    ("missing input", {"inputs": [X1]}, {}, "missing input 'mask'"),
    ("wrong dtype", {"inputs": [{**X1, "datatype": "FP64"}, MASK1]}, {}, "input 'x' expects float32"),
    ("wrong shape", {"inputs": [{**X1, "shape": [2, 3]}, MASK1]}, {}, "dimension 1 is 3, expected 6"),
    (
        "batch 0",
        {"inputs": [{**X1, "shape": [0, 6], "data": []}, {**MASK1, "shape": [0, 6], "data": []}]},
        {},
        "batch size 0",
    ),
    (
        "batch mismatch",
        {"inputs": [X1, {**MASK1, "shape": [2, 6], "data": [1] * 12}]},
        {},
        "inconsistent batch",
    ),
    ("unknown output", {"inputs": [X1, MASK1], "outputs": [{"name": "z"}]}, {}, "unknown output 'z'"),
    (
        "binary size",
        {"inputs": [X1_BIN, MASK1]},
        "bin",
        "binary_data_size is 10 but FP32 [1, 6] takes 24 bytes",
    ),
    (
        "header length",
        {"inputs": [X1, MASK1]},
        {"Inference-Header-Content-Length": "x"},
        "must be an integer",
    ),
]


@pytest.mark.parametrize(("case", "payload", "headers", "message"), BAD_OIP, ids=[c[0] for c in BAD_OIP])
def test_bad_infer_requests_get_400_then_service_continues(
    case: str, payload: Any, headers: Any, message: str, pair_gw: Any, pair: Any, http: Any
) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if headers == "bin":  # the JSON, then 10 bytes of binary data
        headers = {"Inference-Header-Content-Length": str(len(body))}
        body += b"\0" * 10
    status, resp_headers, data = http(pair_gw)("POST", INFER, body, headers)
    assert status == 400, data
    assert resp_headers["content-type"].startswith("application/json")
    error = json.loads(data)
    assert set(error) == {"error"} and message in error["error"]
    _assert_serves(pair_gw, pair, http)


def _assert_serves(gw: Any, pair: Any, http: Any) -> None:
    status, body = http(gw).json("POST", INFER, {"inputs": _json_inputs(_pair(1))})
    assert status == 200
    y = np.asarray(body["outputs"][0]["data"], np.float32).reshape(1, 3)
    np.testing.assert_array_equal(y, pair.reference(_pair(1))["y"])
