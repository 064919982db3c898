"""Fixtures of the gateway tests: tiny ONNX models built inline and real gateways on 127.0.0.1.

Each gateway runs ``serve_app`` on its own event loop in a background thread, on a socket bound to a free
port, backed by a real :class:`InProcessPipeline`; the tests talk to it over HTTP from the test thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerline.runtime.inprocess import InProcessPipeline
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec
from layerline.serve.app import GatewaySettings, bind_socket, create_app, serve_app
from layerline.serve.model_info import ModelInfo
from layerline.tensors import TensorSpec


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _f32(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@dataclass(frozen=True)
class Built:
    """A model built for the tests: its stage files, the monolithic file and what the gateway serves."""

    stages: tuple[StageSpec, ...]
    whole: Path
    info: ModelInfo

    def pipeline(self) -> InProcessPipeline:
        return InProcessPipeline(list(self.stages))

    def reference(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The monolithic model's outputs, run by onnxruntime directly."""
        session = open_session(self.whole, 1, True)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve_models")


@pytest.fixture(scope="session")
def mlp(models_dir: Path) -> Built:
    """``input`` float32 [batch, 8] -> ``logits`` float32 [batch, 4], cut into two stages."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2")
    first = [
        helper.make_node("MatMul", ["input", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["hidden"]),
    ]
    second = [
        helper.make_node("MatMul", ["hidden", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["logits"]),
    ]
    x, h, y = _f32("input", ["batch", 8]), _f32("hidden", ["batch", 16]), _f32("logits", ["batch", 4])
    s0 = _save(helper.make_graph(first, "s0", [x], [h], [w1, b1]), models_dir / "mlp_s0.onnx")
    s1 = _save(helper.make_graph(second, "s1", [h], [y], [w2, b2]), models_dir / "mlp_s1.onnx")
    whole = _save(
        helper.make_graph(first + second, "mlp", [x], [y], [w1, b1, w2, b2]), models_dir / "mlp.onnx"
    )
    stages = (StageSpec(0, str(s0), exact=True), StageSpec(1, str(s1), exact=True))
    return Built(stages, whole, ModelInfo.from_onnx(whole, name="mlp"))


@pytest.fixture(scope="session")
def pair(models_dir: Path) -> Built:
    """``x`` float32 [batch, 6] and ``mask`` int64 [batch, 6] -> ``y`` float32 [batch, 3], ``count`` int64."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "maskf"], ["xm"]),
        helper.make_node("MatMul", ["xm", "w"], ["y"]),
        helper.make_node("ReduceSum", ["mask", "axes"], ["count"], keepdims=1),
    ]
    inputs = [_f32("x", ["batch", 6]), helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 6])]
    outputs = [
        _f32("y", ["batch", 3]),
        helper.make_tensor_value_info("count", TensorProto.INT64, ["batch", 1]),
    ]
    whole = _save(helper.make_graph(nodes, "pair", inputs, outputs, [w, axes]), models_dir / "pair.onnx")
    return Built((StageSpec(0, str(whole), exact=True),), whole, ModelInfo.from_onnx(whole, name="pair"))


@pytest.fixture(scope="session")
def slow(models_dir: Path) -> Built:
    """``x`` float32 [batch, 512] through 8 MatMul+Tanh layers: ~40 us per row, for deadlines and load."""
    rng = np.random.default_rng(3)
    nodes, weights, prev = [], [], "x"
    for i in range(8):
        weights.append(
            numpy_helper.from_array((rng.standard_normal((512, 512)) / 24).astype(np.float32), f"w{i}")
        )
        out = "y" if i == 7 else f"t{i}"
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [out]),
        ]
        prev = out
    graph = helper.make_graph(
        nodes, "slow", [_f32("x", ["batch", 512])], [_f32("y", ["batch", 512])], weights
    )
    whole = _save(graph, models_dir / "slow.onnx")
    return Built((StageSpec(0, str(whole), exact=True),), whole, ModelInfo.from_onnx(whole, name="slow"))


@pytest.fixture(scope="session")
def fixed_batch(models_dir: Path) -> Built:
    """An ONNX model fixed at batch 1, served under a ModelInfo that claims a dynamic batch.

    A request with 2 items passes the gateway's checks and fails inside onnxruntime: a real StageFailed.
    """
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["out"])],
        "fixed",
        [_f32("input", [1, 8])],
        [_f32("out", [1, 8])],
        [w],
    )
    whole = _save(graph, models_dir / "fixed.onnx")
    info = ModelInfo(
        "fixed",
        (TensorSpec("input", "float32", ("batch", 8)),),
        (TensorSpec("out", "float32", ("batch", 8)),),
    )
    return Built((StageSpec(0, str(whole), exact=True),), whole, info)


class GatewayThread:
    """A real gateway on 127.0.0.1:<free port>, served from a background thread's event loop."""

    def __init__(self, pipeline: Any, model: ModelInfo, settings: GatewaySettings) -> None:
        self.pipeline, self.model = pipeline, model
        self.app = create_app(pipeline, model, settings)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"gateway-{self.port}", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def run() -> None:
            self._stop = asyncio.Event()
            self._ready.set()
            await serve_app(self.app, self.sock, self._stop)

        try:
            self.loop.run_until_complete(run())
        except BaseException as exc:  # surfaced by the tests that look at .error
            self.error = exc
            self._ready.set()
        finally:
            self.loop.close()

    def start(self) -> GatewayThread:
        self._thread.start()
        assert self._ready.wait(10), "gateway thread did not start"
        # The socket already listens, so this waits in the backlog until the site accepts.
        with urllib.request.urlopen(self.url + "/v2/health/live", timeout=10) as resp:
            assert resp.status == 200
        return self

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the gateway's loop (e.g. to close its pipeline) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)
            assert not self._thread.is_alive(), "gateway thread did not stop"
        self.sock.close()


@pytest.fixture
def gateway() -> Iterator[Callable[..., GatewayThread]]:
    """Factory: ``gateway(built_or_pipeline, model=None, **settings)`` -> a started GatewayThread."""
    started: list[GatewayThread] = []

    def make(source: Built | Any, model: ModelInfo | None = None, **settings: Any) -> GatewayThread:
        pipeline = source.pipeline() if isinstance(source, Built) else source
        info = model or source.info
        gw = GatewayThread(pipeline, info, GatewaySettings(**settings)).start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def mlp_gw(mlp: Built) -> Iterator[GatewayThread]:
    gw = GatewayThread(mlp.pipeline(), mlp.info, GatewaySettings(max_body_bytes=64 * 1024)).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def pair_gw(pair: Built) -> Iterator[GatewayThread]:
    gw = GatewayThread(pair.pipeline(), pair.info, GatewaySettings(max_body_bytes=64 * 1024)).start()
    yield gw
    gw.stop()


class Http:
    """Plain HTTP calls that return (status, headers, body) for every status, errors included."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, _, data = self(method, path, body, {"Content-Type": "application/json"})
        return status, json.loads(data)


@pytest.fixture
def http() -> Callable[[GatewayThread], Http]:
    return lambda gw: Http(gw.url)
