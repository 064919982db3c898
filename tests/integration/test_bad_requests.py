"""A REAL deployment (``vgg16-tiny`` in 2 stages: worker processes, a gateway process, sockets) facing bad
requests sent with plain ``http.client``, and losing its middle stage to ``kill -9``.

Every bad request gets the right 4xx with a message that names the problem, nothing bad reaches the stages,
and a valid request right after it still gets the (bit-exact) right answer. A killed stage turns the next
request into a fast 5xx (never a hang) and the readiness probe into 503.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from integration_support import deployed, error_message, http_request, monolithic

from layerline.engines import processes
from layerline.examples import EXAMPLES, build_example
from layerline.graph import slice_model
from layerline.serve.oip import HEADER_LENGTH, decode_infer_response, encode_infer_request

pytestmark = pytest.mark.slow

NAME = "vgg-bad-requests"
#: Large enough for 2 images (12 KiB each) in .npy; the too-large requests send 64 (768 KiB).
MAX_BODY_BYTES = 64 * 1024
NPY = {"Content-Type": "application/octet-stream"}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _oip(inputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    body, header_length = encode_infer_request(inputs)
    assert header_length is not None
    return body, {**NPY, HEADER_LENGTH: str(header_length)}


class _Evil:
    """Unpickling this creates a directory: proof that the server unpickled the body."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _object_npy(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    body = buf.getvalue()
    assert b"O'" in body[:128]  # the header declares dtype object ('|O')
    return body


def _object_npz(marker: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("input.npy", _object_npy(marker))
    return buf.getvalue()


@dataclass(frozen=True)
class Live:
    """The running deployment and what a valid request must answer."""

    url: str
    valid: np.ndarray  # two images
    expected: np.ndarray
    expected_one: np.ndarray  # for the first image alone


@pytest.fixture(scope="module")
def vgg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("vgg-bad")
    model = build_example("vgg16-tiny", work / "vgg16-tiny.onnx")
    slice_model(model, work / "sliced", name="vgg16-tiny")
    return model, work / "sliced"


@pytest.fixture(scope="module")
def live(vgg: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One exact deployment for every bad request; its state lives in this module's own LAYERLINE_HOME."""
    model, sliced = vgg
    valid = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(7))["input"]
    expected = monolithic(model, {"input": valid}, exact=True)["logits"]
    expected_one = monolithic(model, {"input": valid[:1]}, exact=True)["logits"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAYERLINE_HOME", str(tmp_path_factory.mktemp("home")))
        with deployed(sliced, 2, NAME, exact=True, max_body_bytes=MAX_BODY_BYTES) as (_, state):
            yield Live(state.url, valid, expected, expected_one)


def _assert_still_serves(live: Live) -> None:
    status, body, _ = http_request(live.url, "POST", "/input", _npy(live.valid), NPY)
    assert status == 200, error_message(body)
    assert np.array_equal(np.load(io.BytesIO(body), allow_pickle=False), live.expected)
    # JSON carries ~20 bytes per value: one image stays under the body limit
    json_body, _ = encode_infer_request({"input": live.valid[:1]}, binary=False)
    status, body, _ = http_request(
        live.url, "POST", f"/v2/models/{NAME}/infer", json_body, {"Content-Type": "application/json"}
    )
    assert status == 200, error_message(body)
    assert np.array_equal(decode_infer_response(body, None)["logits"], live.expected_one)


@dataclass(frozen=True)
class Bad:
    """A bad request: where it goes, its body and headers, and what the gateway must answer."""

    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    says: tuple[str, ...]  # every one of these appears in the error message
    chunked: bool = False


def _image(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(0).random(shape).astype(dtype)


BAD: dict[str, Callable[[Path], Bad]] = {
    "wrong-shape-npy": lambda _: Bad(
        "/input",
        _npy(_image((1, 3, 31, 32))),
        NPY,
        400,
        ("'input'", "[batch, 3, 32, 32]", "[1, 3, 31, 32]", "dimension 2"),
    ),
    "wrong-rank-oip": lambda _: Bad(
        f"/v2/models/{NAME}/infer",
        *_oip({"input": _image((3, 32, 32))}),
        400,
        ("'input'", "[batch, 3, 32, 32]", "[3, 32, 32]", "rank 3"),
    ),
    "wrong-dtype-npy": lambda _: Bad(
        "/input", _npy(_image((1, 3, 32, 32), np.float64)), NPY, 400, ("float32", "float64", "no cast")
    ),
    "wrong-dtype-oip": lambda _: Bad(
        f"/v2/models/{NAME}/infer",
        *_oip({"input": _image((1, 3, 32, 32), np.int32)}),
        400,
        ("float32", "int32"),
    ),
    "truncated-npy-data": lambda _: Bad(
        "/input", _npy(_image((2, 3, 32, 32)))[:5000], NPY, 400, ("malformed", ".npy")
    ),
    "truncated-npy-header": lambda _: Bad(
        "/input", _npy(_image((2, 3, 32, 32)))[:40], NPY, 400, ("malformed", ".npy")
    ),
    "object-npy": lambda marker: Bad("/input", _object_npy(marker), NPY, 400, ("object arrays",)),
    "object-npz": lambda marker: Bad("/input", _object_npz(marker), NPY, 400, ("object arrays",)),
    "empty-batch-npy": lambda _: Bad(
        "/input", _npy(np.zeros((0, 3, 32, 32), np.float32)), NPY, 400, ("batch size 0",)
    ),
    "empty-batch-oip": lambda _: Bad(
        f"/v2/models/{NAME}/infer",
        *_oip({"input": np.zeros((0, 3, 32, 32), np.float32)}),
        400,
        ("batch size 0",),
    ),
    "too-large": lambda _: Bad(
        "/input", _npy(_image((64, 3, 32, 32))), NPY, 413, (f"limit of {MAX_BODY_BYTES} bytes",)
    ),
    "too-large-chunked": lambda _: Bad(
        "/input", _npy(_image((64, 3, 32, 32))), NPY, 413, (f"limit of {MAX_BODY_BYTES} bytes",), True
    ),
    "oip-data-length": lambda _: Bad(
        f"/v2/models/{NAME}/infer",
        json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3000}]}
        ).encode(),
        {"Content-Type": "application/json"},
        400,
        ("3000 values", "[1, 3, 32, 32]", "needs 3072"),
    ),
    "unknown-model": lambda _: Bad(
        "/v2/models/no-such-model/infer",
        *_oip({"input": _image((1, 3, 32, 32))}),
        404,
        ("no-such-model", NAME),
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_request_is_refused_and_the_deployment_still_serves(live: Live, kind: str, tmp_path: Path):
    marker = tmp_path / "unpickled"
    bad = BAD[kind](marker)
    status, body, _ = http_request(live.url, "POST", bad.path, bad.body, bad.headers, chunked=bad.chunked)
    message = error_message(body)
    assert status == bad.status, f"{kind}: HTTP {status} {message}"
    for fragment in bad.says:
        assert fragment in message, f"{kind}: {fragment!r} not in {message!r}"
    assert not marker.exists(), "the gateway unpickled a request body"
    if kind.startswith("object-"):  # the probe is live: unpickling this body does create the marker
        loaded = np.load(io.BytesIO(bad.body), allow_pickle=True)
        _ = loaded["input"] if kind.endswith("npz") else loaded
        assert marker.is_dir()
    _assert_still_serves(live)


REQUEST_TIMEOUT_S = 5.0


def test_killed_middle_stage_fails_fast_and_readiness_says_503(vgg: tuple[Path, Path]):
    model, sliced = vgg
    valid = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(8))["input"]
    expected = monolithic(model, {"input": valid}, exact=False)["logits"]
    with deployed(sliced, 3, "vgg-kill", request_timeout_s=REQUEST_TIMEOUT_S) as (engine, state):
        status, body, _ = http_request(state.url, "POST", "/input", _npy(valid), NPY)
        assert status == 200, error_message(body)
        np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, rtol=1e-5, atol=1e-5)

        (middle,) = [p for p in engine.status(state.name).processes if p.role == "stage1"]
        assert middle.running
        os.kill(middle.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while processes.is_running(middle.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not processes.is_running(middle.pid)

        limit = REQUEST_TIMEOUT_S + 2.0
        for attempt in range(2):  # the first request after the loss, and one more
            status, body, took = http_request(
                state.url, "POST", "/input", _npy(valid), NPY, timeout_s=limit + 3.0
            )
            assert status in (503, 504), f"attempt {attempt}: HTTP {status} {error_message(body)}"
            assert took <= limit, f"attempt {attempt}: the 5xx took {took:.2f} s"
            assert error_message(body), "the 5xx carries no message"

        # the readiness probe is cached for 0.5 s and bounded by 2 s: a 503 must show within that
        deadline = time.monotonic() + 4.0
        while True:
            status, body, took = http_request(state.url, "GET", "/v2/health/ready", timeout_s=5.0)
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 503, f"/v2/health/ready answered {status} {body!r} with stage 1 killed"
        health = json.loads(body)
        assert health["ready"] is False and health["detail"]
        assert len(health["stages"]) == 3 and not all(s["ready"] for s in health["stages"]), health
        # `layerline status` (the engine's view) names the dead process and the unhealthy chain
        status_now = engine.status(state.name)
        assert not status_now.ready
        by_role = {p.role: p for p in status_now.processes}
        assert not by_role["stage1"].running
        assert any(by_role[r].health != "ready" for r in ("stage0", "stage1", "stage2"))
    assert not any(processes.is_running(p.pid) for p in state.processes)
