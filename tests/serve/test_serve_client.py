"""GatewayClient against real gateways, and its error mapping."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from layerline.errors import BadRequest, DeadlineExceeded, InferenceError, StageFailed, StageUnavailable
from layerline.serve.client import GatewayClient, GatewayUnreachable, error_for_status
from layerline.tensors import TensorSpec


def _pair(batch: int) -> dict[str, np.ndarray]:
    x = np.linspace(-2, 2, batch * 6, dtype=np.float32).reshape(batch, 6)
    return {"x": x, "mask": (np.arange(batch * 6).reshape(batch, 6) % 2).astype(np.int64)}


def test_predict_npy(mlp_gw: Any, mlp: Any) -> None:
    client = GatewayClient(mlp_gw.url, timeout_s=20)
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    np.testing.assert_array_equal(client.predict_npy(x), mlp.reference({"input": x})["logits"])


def test_infer_binary_and_json(pair_gw: Any, pair: Any) -> None:
    client = GatewayClient(pair_gw.url.removeprefix("http://"), timeout_s=20)  # scheme is optional
    feeds = _pair(3)
    want = pair.reference(feeds)
    for binary in (True, False):
        out = client.infer(feeds, binary=binary, request_id="c1")
        assert list(out) == ["y", "count"]
        np.testing.assert_array_equal(out["y"], want["y"])
        np.testing.assert_array_equal(out["count"], want["count"])
        assert out["count"].dtype == np.int64
    only = client.infer(feeds, outputs=["count"])
    assert list(only) == ["count"]


def test_predict_npz(pair_gw: Any, pair: Any) -> None:
    out = GatewayClient(pair_gw.url).predict_npz(_pair(2))
    np.testing.assert_array_equal(out["y"], pair.reference(_pair(2))["y"])


def test_metadata_health_and_metrics(pair_gw: Any) -> None:
    client = GatewayClient(pair_gw.url)
    assert client.model == "pair"  # discovered through /v2/repository/index
    assert client.model_metadata()["inputs"][1] == {"name": "mask", "datatype": "INT64", "shape": [-1, 6]}
    assert client.server_metadata()["name"] == "layerline"
    info = client.model_info()
    assert info.name == "pair" and info.input("mask") == TensorSpec("mask", "int64", ("?", 6))
    assert client.ready() is True
    client.wait_ready(5)
    assert client.health()["ready"] is True
    assert "layerline_in_flight" in client.metrics()


def test_bad_request_raises_badrequest_with_message(pair_gw: Any, pair: Any) -> None:
    client = GatewayClient(pair_gw.url)
    with pytest.raises(BadRequest, match="input 'mask' expects int64") as info:
        client.infer({"x": _pair(1)["x"], "mask": _pair(1)["mask"].astype(np.int32)})
    assert info.value.http_status == 400
    with pytest.raises(BadRequest, match="this model takes 2 inputs"):
        client.predict_npy(_pair(1)["x"])
    np.testing.assert_array_equal(client.infer(_pair(1))["y"], pair.reference(_pair(1))["y"])


def test_unknown_model_is_404_badrequest(pair_gw: Any) -> None:
    with pytest.raises(BadRequest, match="unknown model 'other'") as info:
        GatewayClient(pair_gw.url, model="other").model_metadata()
    assert info.value.http_status == 404


def test_stage_failure_raises_stagefailed(gateway: Any, fixed_batch: Any) -> None:
    client = GatewayClient(gateway(fixed_batch).url)
    with pytest.raises(StageFailed, match="stage 0 failed"):
        client.predict_npy(np.ones((2, 8), np.float32))


def test_deadline_raises_deadlineexceeded(gateway: Any, slow: Any) -> None:
    client = GatewayClient(gateway(slow, request_timeout_s=0.02).url)
    with pytest.raises(DeadlineExceeded, match=r"did not complete within 0\.02"):
        client.predict_npy(np.ones((4096, 512), np.float32))


def test_not_ready_gateway(gateway: Any, mlp: Any) -> None:
    gw = gateway(mlp, health_cache_s=0)
    gw.call(gw.pipeline.close())
    client = GatewayClient(gw.url)
    assert client.ready() is False
    assert client.health() == {
        "ready": False,
        "detail": "not started",
        "stages": [
            {"stage": 0, "ready": False, "detail": "in-process"},
            {"stage": 1, "ready": False, "detail": "in-process"},
        ],
    }
    t0 = time.monotonic()
    with pytest.raises(StageUnavailable, match=r"not ready after 0\.3 s: not started"):
        client.wait_ready(0.3, interval_s=0.05)
    assert time.monotonic() - t0 < 5


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_unreachable_gateway_message() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    client = GatewayClient(url, timeout_s=5)
    with pytest.raises(GatewayUnreachable) as info:
        client.predict_npy(np.zeros((1, 8), np.float32))
    message = str(info.value)
    assert message.startswith(f"cannot connect to gateway at {url}")
    assert "is a deployment running? see `layerline status`" in message
    assert isinstance(info.value, StageUnavailable) and info.value.http_status == 503
    assert client.ready() is False
    with pytest.raises(GatewayUnreachable):
        client.health()


def test_silent_server_times_out() -> None:
    """A socket that accepts but never answers: DeadlineExceeded after the client's timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    try:
        client = GatewayClient(f"http://127.0.0.1:{server.getsockname()[1]}", timeout_s=0.3)
        with pytest.raises(DeadlineExceeded, match=r"did not answer within 0\.3 s"):
            client.predict_npy(np.zeros((1, 8), np.float32))
    finally:
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (404, BadRequest),
        (413, BadRequest),
        (500, StageFailed),
        (503, StageUnavailable),
        (504, DeadlineExceeded),
        (502, InferenceError),
    ],
)
def test_error_for_status(status: int, cls: type) -> None:
    exc = error_for_status(status, "boom")
    assert type(exc) is cls and str(exc) == "boom" and exc.http_status == status


def test_client_module_does_not_import_aiohttp() -> None:
    code = "import sys, layerline.serve.client; assert 'aiohttp' not in sys.modules, 'aiohttp imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
