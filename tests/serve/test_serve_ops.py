"""Operations: metrics, readiness and its cache, pipeline errors, load shedding, binding and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from layerline.errors import BadRequest, DeadlineExceeded, EngineError, StageFailed, StageUnavailable
from layerline.runtime.api import PipelineHealth
from layerline.runtime.inprocess import InProcessPipeline
from layerline.serve.app import GatewaySettings, ModelNotFound, Overloaded, outcome_of, run_gateway
from layerline.serve.client import GatewayClient
from layerline.serve.validation import PayloadTooLarge, decode_npy, encode_npy

OCTET = {"Content-Type": "application/octet-stream"}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text as {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(text: str, name: str, **labels: str) -> float | None:
    return _samples(text).get((name, tuple(sorted(labels.items()))))


def _x(batch: int) -> np.ndarray:
    return np.linspace(-1, 1, batch * 8, dtype=np.float32).reshape(batch, 8)


def test_metrics_families_and_counts(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(mlp)
    call = http(gw)
    status, headers, data = call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = data.decode()
    for family in (
        "layerline_requests_total",
        "layerline_request_seconds",
        "layerline_stage_compute_seconds",
        "layerline_stage_transfer_seconds",
        "layerline_stage_queue_seconds",
        "layerline_in_flight",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in text
    assert _metric(text, "layerline_in_flight") == 0.0

    for _ in range(2):
        assert call("POST", "/input", encode_npy(_x(2)), OCTET)[0] == 200
    assert call("POST", "/input", b"junk", OCTET)[0] == 400
    assert http(gw).json("POST", "/v2/models/nope/infer", {"inputs": []})[0] == 404
    payload = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}
    assert http(gw).json("POST", "/v2/models/mlp/infer", payload)[0] == 200

    text = call("GET", "/metrics")[2].decode()
    assert _metric(text, "layerline_requests_total", endpoint="input", outcome="ok") == 2
    assert _metric(text, "layerline_requests_total", endpoint="input", outcome="bad_request") == 1
    assert _metric(text, "layerline_requests_total", endpoint="infer", outcome="not_found") == 1
    assert _metric(text, "layerline_requests_total", endpoint="infer", outcome="ok") == 1
    assert _metric(text, "layerline_request_seconds_count", endpoint="input") == 3
    assert _metric(text, "layerline_request_seconds_bucket", endpoint="input", le="30.0") == 3
    assert _metric(text, "layerline_request_seconds_bucket", endpoint="input", le="0.0001") is not None
    for stage in ("0", "1"):  # the mlp runs as two stages; 3 requests reached them
        assert _metric(text, "layerline_stage_compute_seconds_count", stage=stage) == 3
        assert _metric(text, "layerline_stage_compute_seconds_sum", stage=stage) > 0
        assert _metric(text, "layerline_stage_transfer_seconds_count", stage=stage) == 3
        assert _metric(text, "layerline_stage_queue_seconds_count", stage=stage) == 3
    assert _metric(text, "layerline_in_flight") == 0.0


def test_metrics_registry_is_per_app(gateway: Any, mlp: Any, http: Any) -> None:
    a, b = gateway(mlp), gateway(mlp)
    assert http(a)("POST", "/input", encode_npy(_x(1)), OCTET)[0] == 200
    assert (
        _metric(
            http(a)("GET", "/metrics")[2].decode(), "layerline_requests_total", endpoint="input", outcome="ok"
        )
        == 1
    )
    assert (
        _metric(
            http(b)("GET", "/metrics")[2].decode(), "layerline_requests_total", endpoint="input", outcome="ok"
        )
        is None
    )


def test_not_ready_when_pipeline_closed(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(mlp, health_cache_s=0)
    assert http(gw).json("GET", "/v2/health/ready")[0] == 200
    gw.call(gw.pipeline.close())  # the real pipeline now reports "not started"
    status, body = http(gw).json("GET", "/v2/health/ready")
    assert status == 503
    assert body["ready"] is False and body["detail"] == "not started"
    assert body["stages"][0] == {"stage": 0, "ready": False, "detail": "in-process"}
    assert http(gw).json("GET", "/v2/models/mlp/ready")[0] == 503
    assert http(gw).json("POST", "/v2/repository/index")[1][0]["state"] == "UNAVAILABLE"
    assert http(gw).json("GET", "/v2/health/live")[0] == 200  # alive, just not ready
    assert GatewayClient(gw.url).ready() is False


class CountingPipeline(InProcessPipeline):
    """The real in-process pipeline, counting its health probes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.probes = 0

    async def health(self, timeout_s: float) -> PipelineHealth:
        self.probes += 1
        return await super().health(timeout_s)


class HangingHealthPipeline(InProcessPipeline):
    """The real pipeline, except that its health probe never answers."""

    async def health(self, timeout_s: float) -> PipelineHealth:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


def test_ready_probe_is_cached(gateway: Any, mlp: Any, http: Any) -> None:
    pipeline = CountingPipeline(list(mlp.stages))
    gw = gateway(pipeline, mlp.info, health_cache_s=30)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: http(gw)("GET", "/v2/health/ready")[0], range(24)))
    assert statuses == [200] * 24
    assert pipeline.probes == 1
    gw.call(pipeline.close())
    assert http(gw)("GET", "/v2/health/ready")[0] == 200  # still the cached answer
    assert pipeline.probes == 1

    uncached = CountingPipeline(list(mlp.stages))
    gw2 = gateway(uncached, mlp.info, health_cache_s=0)
    for _ in range(3):
        http(gw2)("GET", "/v2/health/ready")
    assert uncached.probes == 3


def test_hanging_health_probe_means_not_ready(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(HangingHealthPipeline(list(mlp.stages)), mlp.info, health_timeout_s=0.05, health_cache_s=0)
    t0 = time.monotonic()
    status, body = http(gw).json("GET", "/v2/health/ready")
    assert status == 503 and "did not answer within 0.05 s" in body["detail"]
    assert time.monotonic() - t0 < 5
    assert http(gw)("POST", "/input", encode_npy(_x(1)), OCTET)[0] == 200  # inference is unaffected


def test_stage_failure_is_500_then_service_continues(gateway: Any, fixed_batch: Any, http: Any) -> None:
    gw = gateway(fixed_batch)
    status, _, data = http(gw)("POST", "/input", encode_npy(np.ones((2, 8), np.float32)), OCTET)
    assert status == 500
    assert "stage 0 failed" in json.loads(data)["error"]
    status, _, data = http(gw)("POST", "/input", encode_npy(np.ones((1, 8), np.float32)), OCTET)
    assert status == 200
    np.testing.assert_array_equal(decode_npy(data), np.ones((1, 8), np.float32))
    text = http(gw)("GET", "/metrics")[2].decode()
    assert _metric(text, "layerline_requests_total", endpoint="input", outcome="stage_failed") == 1


def test_deadline_is_504_then_service_continues(gateway: Any, slow: Any, http: Any) -> None:
    gw = gateway(slow, request_timeout_s=0.03)
    big = np.ones((4096, 512), np.float32)  # ~17 GFLOP: far more than 30 ms
    status, _, data = http(gw)("POST", "/input", encode_npy(big), OCTET)
    assert status == 504
    assert "did not complete within 0.03" in json.loads(data)["error"]
    time.sleep(0.5)  # the abandoned run finishes in the background
    one = np.full((1, 512), 0.01, np.float32)
    status, _, data = http(gw)("POST", "/input", encode_npy(one), OCTET)
    assert status == 200
    np.testing.assert_array_equal(decode_npy(data), slow.reference({"x": one})["y"])
    text = http(gw)("GET", "/metrics")[2].decode()
    assert _metric(text, "layerline_requests_total", endpoint="input", outcome="deadline") == 1


def _wait_in_flight(gw: Any, http: Any, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _metric(http(gw)("GET", "/metrics")[2].decode(), "layerline_in_flight") == value:
            return
        time.sleep(0.002)
    raise AssertionError(f"in-flight never reached {value}")


def test_over_max_in_flight_is_503(gateway: Any, slow: Any, http: Any) -> None:
    gw = gateway(slow, max_in_flight=1)
    results: list[int] = []
    big = encode_npy(np.ones((4096, 512), np.float32))
    worker = threading.Thread(target=lambda: results.append(http(gw)("POST", "/input", big, OCTET)[0]))
    worker.start()
    try:
        _wait_in_flight(gw, http, 1.0)
        status, headers, data = http(gw)("POST", "/input", encode_npy(np.ones((1, 512), np.float32)), OCTET)
        assert status == 503 and headers["retry-after"] == "1"
        assert "max_in_flight=1" in json.loads(data)["error"]
    finally:
        worker.join(30)
    assert results == [200]
    assert http(gw)("POST", "/input", encode_npy(np.ones((1, 512), np.float32)), OCTET)[0] == 200
    text = http(gw)("GET", "/metrics")[2].decode()
    assert _metric(text, "layerline_requests_total", endpoint="input", outcome="overloaded") == 1


def test_concurrent_requests_all_correct(mlp_gw: Any, mlp: Any, http: Any) -> None:
    def one(i: int) -> bool:
        x = _x(1 + i % 4) * (i + 1)
        status, _, data = http(mlp_gw)("POST", "/input", encode_npy(x), OCTET)
        return status == 200 and np.array_equal(decode_npy(data), mlp.reference({"input": x})["logits"])

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(40)))


@pytest.mark.parametrize(
    ("exc", "outcome", "status"),
    [
        (BadRequest("x"), "bad_request", 400),
        (ModelNotFound("x"), "not_found", 404),
        (PayloadTooLarge("x"), "too_large", 413),
        (StageFailed("x"), "stage_failed", 500),
        (StageUnavailable("x"), "unavailable", 503),
        (Overloaded("x"), "overloaded", 503),
        (DeadlineExceeded("x"), "deadline", 504),
        (ValueError("x"), "error", None),
    ],
)
def test_outcomes_and_statuses(exc: Exception, outcome: str, status: int | None) -> None:
    assert outcome_of(exc) == outcome
    if status is not None:
        assert exc.http_status == status


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "port must be in 0..65535"),
        ({"max_body_bytes": 0}, "max_body_bytes must be >= 1"),
        ({"request_timeout_s": 0}, "request_timeout_s must be > 0"),
        ({"health_timeout_s": -1}, "health_timeout_s must be > 0"),
        ({"health_cache_s": -1}, "health_cache_s must be >= 0"),
        ({"max_in_flight": 0}, "max_in_flight must be >= 1"),
    ],
)
def test_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewaySettings(**kwargs)


def test_taken_port_is_a_clear_error(mlp: Any) -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    pipeline = mlp.pipeline()
    try:
        with pytest.raises(EngineError, match=f"^port {port} is in use by another process; pass --port$"):
            run_gateway(pipeline, mlp.info, GatewaySettings(port=port))
    finally:
        holder.close()
    assert asyncio.run(pipeline.health(1.0)).detail == "not started"  # it failed before starting anything


SERVER_SCRIPT = """
import logging, sys
from layerline.runtime.inprocess import InProcessPipeline
from layerline.runtime.stagespec import StageSpec
from layerline.serve.app import GatewaySettings, run_gateway
from layerline.serve.model_info import ModelInfo
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
path, port = sys.argv[1], int(sys.argv[2])
pipeline = InProcessPipeline([StageSpec(0, path)])
run_gateway(pipeline, ModelInfo.from_onnx(path, "slow"), GatewaySettings(port=port))
print("clean exit", flush=True)
"""


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_run_gateway_drains_and_exits_on_sigterm(slow: Any, tmp_path: Path, http: Any) -> None:
    port = _free_port()
    log_path = tmp_path / "gateway.log"  # a file, not a pipe: the access log must never block the server
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(slow.whole), str(port)],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        client = GatewayClient(f"http://127.0.0.1:{port}", timeout_s=30)
        client.wait_ready(30)
        results: list[np.ndarray] = []
        big = np.ones((4096, 512), np.float32)
        worker = threading.Thread(target=lambda: results.append(client.predict_npy(big)))
        worker.start()

        class _Gw:
            url = client.url

        _wait_in_flight(_Gw, http, 1.0)
        proc.send_signal(signal.SIGTERM)
        worker.join(30)
        assert len(results) == 1 and results[0].shape == (4096, 512)  # the in-flight request completed
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = log_path.read_text()
    assert proc.returncode == 0, err
    assert "clean exit" in out
    assert "listening on http://127.0.0.1:" in err and "gateway stopped" in err
    assert not GatewayClient(f"http://127.0.0.1:{port}", timeout_s=2).ready()
