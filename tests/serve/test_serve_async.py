"""Asynchronous requests (``/v1/requests``) on real gateways over InProcessPipeline and real onnxruntime."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from layerline.errors import BadRequest, DeadlineExceeded, StageFailed
from layerline.runtime.api import InferResult, PipelineHealth
from layerline.runtime.inprocess import InProcessPipeline
from layerline.serve.client import GatewayClient
from layerline.serve.validation import encode_npy, encode_npz

OCTET = {"Content-Type": "application/octet-stream"}
JSON = {"Content-Type": "application/json"}


class GatedPipeline:
    """A real Pipeline (the protocol the gateway depends on): InProcessPipeline behind a gate the test opens.

    ``infer`` waits for ``gate`` before running the request through real onnxruntime sessions, so a test
    can hold requests in the ``running`` state for as long as it likes. The work is shielded, as with a
    request already in the stages: a cancelled caller stops waiting but the work still finishes.
    """

    def __init__(self, inner: InProcessPipeline) -> None:
        self.inner = inner
        self.gate: asyncio.Event | None = None
        self.entered = 0
        self.finished = 0

    async def start(self) -> None:
        self.gate = asyncio.Event()
        await self.inner.start()

    async def infer(self, inputs: dict[str, np.ndarray], timeout_s: float) -> InferResult:
        # Like a request already handed to the stages: cancelling the caller does not stop the work.
        return await asyncio.shield(asyncio.ensure_future(self._run(inputs, timeout_s)))

    async def _run(self, inputs: dict[str, np.ndarray], timeout_s: float) -> InferResult:
        assert self.gate is not None
        self.entered += 1
        await self.gate.wait()
        result = await self.inner.infer(inputs, timeout_s)
        self.finished += 1
        return result

    async def health(self, timeout_s: float) -> PipelineHealth:
        return await self.inner.health(timeout_s)

    async def close(self) -> None:
        await self.inner.close()


def _open(gw: Any) -> None:
    gw.loop.call_soon_threadsafe(gw.pipeline.gate.set)


def _x(batch: int) -> np.ndarray:
    return np.linspace(-1, 1, batch * 8, dtype=np.float32).reshape(batch, 8)


def _pair(batch: int) -> dict[str, np.ndarray]:
    x = np.linspace(-2, 2, batch * 6, dtype=np.float32).reshape(batch, 6)
    return {"x": x, "mask": (np.arange(batch * 6).reshape(batch, 6) % 2).astype(np.int64)}


def _metrics(call: Any) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(call("GET", "/metrics")[2].decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _gauge(call: Any) -> dict[str, float]:
    m = _metrics(call)
    return {k[1][0][1]: v for k, v in m.items() if k[0] == "layerline_async_requests"}


def _submit(call: Any, body: bytes, headers: dict[str, str] = OCTET) -> dict[str, Any]:
    status, resp_headers, data = call("POST", "/v1/requests", body, headers)
    assert status == 202, data
    doc = json.loads(data)
    assert resp_headers["location"] == doc["status_url"] == f"/v1/requests/{doc['id']}"
    return doc


def _until(call: Any, job_id: str, statuses: tuple[str, ...], limit_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while True:
        wait = 1 if "running" not in statuses else 0  # a long poll only returns early when the job ends
        status, _, data = call("GET", f"/v1/requests/{job_id}?wait={wait}")
        assert status == 200, data
        doc = json.loads(data)
        if doc["status"] in statuses:
            return doc
        assert time.monotonic() < deadline, f"request stayed {doc['status']}"
        time.sleep(0.02)


def test_npy_submit_poll_result(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(mlp)
    call = http(gw)
    x = _x(3)
    doc = _submit(call, encode_npy(x))
    assert doc["status"] == "queued" and re.fullmatch(r"[0-9a-f]{32}", doc["id"])
    assert doc["created_at"].endswith("Z") and doc["finished_at"] is None
    done = _until(call, doc["id"], ("succeeded",))
    assert done["result_url"] == f"/v1/requests/{doc['id']}/result"
    assert done["started_at"] and done["finished_at"] and done["expires_at"]
    status, headers, body = call("GET", done["result_url"])
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    got = np.load(io.BytesIO(body), allow_pickle=False)
    np.testing.assert_array_equal(got, mlp.reference({"input": x})["logits"])
    assert call("GET", done["result_url"])[2] == body  # a result can be fetched again until it expires
    assert _submit(call, encode_npy(x))["id"] != doc["id"]


def test_npz_and_oip_json_results_equal_onnxruntime(gateway: Any, pair: Any, http: Any) -> None:
    call = http(gateway(pair))
    feeds = _pair(2)
    want = pair.reference(feeds)
    doc = _submit(call, encode_npz(feeds))
    _until(call, doc["id"], ("succeeded",))
    status, _, body = call("GET", f"/v1/requests/{doc['id']}/result")
    with np.load(io.BytesIO(body), allow_pickle=False) as out:
        assert sorted(out.files) == ["count", "y"]
        np.testing.assert_array_equal(out["y"], want["y"])
        np.testing.assert_array_equal(out["count"], want["count"])

    request = {
        "id": "r-7",
        "inputs": [
            {"name": "x", "shape": [2, 6], "datatype": "FP32", "data": feeds["x"].ravel().tolist()},
            {"name": "mask", "shape": [2, 6], "datatype": "INT64", "data": feeds["mask"].ravel().tolist()},
        ],
        "outputs": [{"name": "count"}],
    }
    doc = _submit(call, json.dumps(request).encode(), JSON)
    _until(call, doc["id"], ("succeeded",))
    status, headers, body = call("GET", f"/v1/requests/{doc['id']}/result")
    assert status == 200 and headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["id"] == "r-7" and [o["name"] for o in answer["outputs"]] == ["count"]
    assert answer["outputs"][0]["data"] == want["count"].ravel().tolist()


def test_client_submit_wait_result_and_cancel_finished(gateway: Any, pair: Any) -> None:
    client = GatewayClient(gateway(pair).url, timeout_s=20)
    feeds = _pair(3)
    want = pair.reference(feeds)
    for binary in (True, False):
        job_id = client.submit(feeds, binary=binary)
        out = client.wait(job_id, timeout_s=10, poll_s=2)
        np.testing.assert_array_equal(out["y"], want["y"])
        np.testing.assert_array_equal(out["count"], want["count"])
        assert client.request_status(job_id)["status"] == "succeeded"
        np.testing.assert_array_equal(client.result(job_id)["y"], want["y"])
    with pytest.raises(BadRequest, match="already succeeded") as info:
        client.cancel(job_id)
    assert info.value.http_status == 409
    with pytest.raises(BadRequest, match="no async request") as info:
        client.request_status("0" * 32)
    assert info.value.http_status == 404


def test_bad_input_is_refused_at_once_and_nothing_is_stored(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(mlp, max_body_bytes=4096)
    call = http(gw)
    cases = [
        (encode_npy(_x(2).astype(np.float64)), OCTET, 400, "expects float32"),
        (b"junk", OCTET, 400, "neither a .npy nor an .npz"),
        (b'{"inputs": [', OCTET, 400, "it looks like JSON"),
        (b'{"inputs": [', JSON, 400, "not valid JSON"),
        (
            json.dumps(
                {"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]}
            ).encode(),
            JSON,
            400,
            "unknown input 'nope'",
        ),
        (encode_npy(np.zeros((200, 8), np.float32)), OCTET, 413, "larger than the gateway's limit"),
    ]
    for body, headers, want_status, message in cases:
        status, _, data = call("POST", "/v1/requests", body, headers)
        assert status == want_status, data
        assert message in json.loads(data)["error"]
    assert set(_gauge(call).values()) == {0.0}
    m = _metrics(call)
    assert m[("layerline_async_inputs_bytes", ())] == 0
    assert m[("layerline_requests_total", (("endpoint", "submit"), ("outcome", "bad_request")))] == 5
    assert m[("layerline_requests_total", (("endpoint", "submit"), ("outcome", "too_large")))] == 1
    # and the gateway still serves
    _until(call, _submit(call, encode_npy(_x(1)))["id"], ("succeeded",))


def test_unknown_ids_and_bad_wait(mlp_gw: Any, http: Any) -> None:
    call = http(mlp_gw)
    for method, path in (
        ("GET", "/v1/requests/0123456789abcdef0123456789abcdef"),
        ("GET", "/v1/requests/nope/result"),
        ("DELETE", "/v1/requests/nope"),
    ):
        status, _, data = call(method, path)
        assert status == 404 and "no async request" in json.loads(data)["error"]
    doc = _submit(call, encode_npy(_x(1)))
    for bad in ("abc", "-1", "61", "nan"):
        status, _, data = call("GET", f"/v1/requests/{doc['id']}?wait={bad}")
        assert status == 400 and "wait must be" in json.loads(data)["error"]


def test_cancel_queued_and_running(gateway: Any, mlp: Any, http: Any) -> None:
    pipe = GatedPipeline(mlp.pipeline())
    gw = gateway(pipe, mlp.info, async_concurrency=1)
    call = http(gw)
    running = _submit(call, encode_npy(_x(1)))["id"]
    queued = _submit(call, encode_npy(_x(2)))["id"]
    assert _until(call, running, ("running",))["started_at"]
    status, _, data = call("GET", f"/v1/requests/{queued}?wait=0.2")  # long poll times out: still queued
    assert status == 200 and json.loads(data)["status"] == "queued"
    assert pipe.entered == 1
    for job_id in (running, queued):
        status, _, data = call("GET", f"/v1/requests/{job_id}/result")
        assert status == 409 and "no result yet" in json.loads(data)["error"]
    assert _gauge(call)["running"] == 1 and _gauge(call)["queued"] == 1

    for job_id in (queued, running):
        status, _, data = call("DELETE", f"/v1/requests/{job_id}")
        doc = json.loads(data)
        assert status == 200 and doc["status"] == "cancelled" and doc["finished_at"]
        assert call("DELETE", f"/v1/requests/{job_id}")[0] == 200  # cancelling again: same answer
        status, _, data = call("GET", f"/v1/requests/{job_id}/result")
        assert status == 410 and "was cancelled" in json.loads(data)["error"]

    _open(gw)  # the running one reaches the pipeline's end; its late result is dropped
    deadline = time.monotonic() + 10
    while pipe.finished < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert json.loads(call("GET", f"/v1/requests/{running}")[2])["status"] == "cancelled"
    assert pipe.entered == 1  # the queued one never reached the pipeline

    done = _submit(call, encode_npy(_x(1)))["id"]
    _until(call, done, ("succeeded",))
    status, _, data = call("DELETE", f"/v1/requests/{done}")
    assert status == 409 and "already succeeded" in json.loads(data)["error"]
    gauge = _gauge(call)
    assert gauge["cancelled"] == 2 and gauge["succeeded"] == 1 and gauge["queued"] == gauge["running"] == 0
    m = _metrics(call)
    assert m[("layerline_async_finished_total", (("status", "cancelled"),))] == 2
    assert m[("layerline_async_inputs_bytes", ())] == 0


def test_store_full_is_503_with_retry_after(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(GatedPipeline(mlp.pipeline()), mlp.info, async_max_pending=2)
    call = http(gw)
    first = [_submit(call, encode_npy(_x(1)))["id"] for _ in range(2)]
    status, headers, data = call("POST", "/v1/requests", encode_npy(_x(1)), OCTET)
    assert status == 503 and headers["retry-after"] == "1"
    assert "async_max_pending=2" in json.loads(data)["error"]
    m = _metrics(call)
    assert m[("layerline_requests_total", (("endpoint", "submit"), ("outcome", "overloaded")))] == 1
    _open(gw)
    for job_id in first:
        _until(call, job_id, ("succeeded",))
    _until(call, _submit(call, encode_npy(_x(1)))["id"], ("succeeded",))


def test_inputs_over_the_byte_budget_are_503(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(GatedPipeline(mlp.pipeline()), mlp.info, async_max_bytes=1000)
    call = http(gw)
    _submit(call, encode_npy(_x(20)))  # 640 bytes held while it waits
    status, headers, data = call("POST", "/v1/requests", encode_npy(_x(20)), OCTET)
    assert status == 503 and headers["retry-after"] == "1"
    assert "async_max_bytes=1000" in json.loads(data)["error"]
    assert _metrics(call)[("layerline_async_inputs_bytes", ())] == 640


def test_oldest_results_are_evicted_for_bytes(gateway: Any, mlp: Any, http: Any) -> None:
    # an .npy result of [10, 4] float32 is 288 bytes; inputs of [10, 8] are 320 bytes while pending
    call = http(gateway(mlp, async_max_bytes=1000))
    ids = []
    for _ in range(4):
        ids.append(_submit(call, encode_npy(_x(10)))["id"])
        _until(call, ids[-1], ("succeeded",))
    # 3 results (864 bytes) + the 4th's inputs (320) > 1000: the oldest result was evicted for them
    first = json.loads(call("GET", f"/v1/requests/{ids[0]}")[2])
    assert first["status"] == "expired" and "evicted to make room" in first["error"]
    status, _, data = call("GET", f"/v1/requests/{ids[0]}/result")
    assert status == 410 and "evicted to make room" in json.loads(data)["error"]
    for job_id in ids[1:]:
        assert call("GET", f"/v1/requests/{job_id}/result")[0] == 200
    m = _metrics(call)
    assert m[("layerline_async_evictions_total", (("reason", "bytes"),))] == 1
    assert m[("layerline_async_evictions_total", (("reason", "ttl"),))] == 0
    assert m[("layerline_async_results_bytes", ())] == 3 * 288


def test_results_expire_after_the_ttl(gateway: Any, mlp: Any, http: Any) -> None:
    call = http(gateway(mlp, async_result_ttl_s=0.3))
    job_id = _submit(call, encode_npy(_x(1)))["id"]
    _until(call, job_id, ("succeeded",))
    assert _metrics(call)[("layerline_async_results_bytes", ())] > 0
    doc = _until(call, job_id, ("expired",), limit_s=5)
    assert "kept for 0.3 s" in doc["error"] and "result_url" not in doc
    status, _, data = call("GET", f"/v1/requests/{job_id}/result")
    assert status == 410 and "kept for 0.3 s" in json.loads(data)["error"]
    m = _metrics(call)
    assert m[("layerline_async_evictions_total", (("reason", "ttl"),))] == 1
    assert m[("layerline_async_results_bytes", ())] == 0
    deadline = time.monotonic() + 5  # the tombstone goes after another TTL: then the id is unknown
    while call("GET", f"/v1/requests/{job_id}")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert set(_gauge(call).values()) == {0.0}


def test_failures_keep_their_status_and_message(gateway: Any, fixed_batch: Any, slow: Any) -> None:
    client = GatewayClient(gateway(fixed_batch).url, timeout_s=20)
    job_id = client.submit({"input": np.ones((2, 8), np.float32)})
    with pytest.raises(StageFailed, match="stage 0 failed"):
        client.wait(job_id, timeout_s=10)
    doc = client.request_status(job_id)
    assert doc["status"] == "failed" and "stage 0 failed" in doc["error"]

    client = GatewayClient(gateway(slow, request_timeout_s=0.02).url, timeout_s=20)
    job_id = client.submit({"x": np.ones((4096, 512), np.float32)})
    with pytest.raises(DeadlineExceeded, match=r"did not complete within 0\.02"):
        client.wait(job_id, timeout_s=10)


def test_wait_gives_up_at_its_timeout_and_the_request_goes_on(gateway: Any, mlp: Any) -> None:
    gw = gateway(GatedPipeline(mlp.pipeline()), mlp.info)
    client = GatewayClient(gw.url, timeout_s=20)
    job_id = client.submit({"input": _x(2)})
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"is still running after 0\.3 s"):
        client.wait(job_id, timeout_s=0.3, poll_s=0.1)
    assert time.monotonic() - t0 < 3
    with pytest.raises(BadRequest, match="no result yet") as info:
        client.result(job_id)
    assert info.value.http_status == 409
    other = client.submit({"input": _x(1)})
    assert client.cancel(other)["status"] == "cancelled"
    with pytest.raises(BadRequest, match="was cancelled") as info:
        client.wait(other, timeout_s=5)
    assert info.value.http_status == 410
    _open(gw)
    np.testing.assert_array_equal(
        client.wait(job_id, timeout_s=10)["logits"], mlp.reference({"input": _x(2)})["logits"]
    )


def test_shutdown_cancels_pending_requests_without_hanging(gateway: Any, mlp: Any, http: Any) -> None:
    gw = gateway(GatedPipeline(mlp.pipeline()), mlp.info, async_concurrency=1)
    call = http(gw)
    _until(call, _submit(call, encode_npy(_x(1)))["id"], ("running",))
    _submit(call, encode_npy(_x(1)))
    t0 = time.monotonic()
    gw.stop()
    assert time.monotonic() - t0 < 5
    assert gw.error is None
