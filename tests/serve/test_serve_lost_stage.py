"""A stage that stops answering (a node cut off, a frozen worker): requests fail fast with 503, not at the
deadline, and the gateway serves again once the stage is back. Real worker processes over loopback TCP."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerline.errors import StageUnavailable
from layerline.runtime.launch import start_local_chain
from layerline.runtime.pipeline import DirectPipeline
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec
from layerline.serve.client import GatewayClient
from layerline.serve.model_info import ModelInfo

pytestmark = pytest.mark.slow

WIDTH, LAYERS = 256, 12


def _stage(path: Path, index: int, rng: np.random.Generator) -> list:
    """Stage ``index``: LAYERS x (MatMul + Tanh) on [batch, WIDTH]; returns its nodes and weights too."""
    nodes, weights, prev = [], [], "x" if index == 0 else f"h{index - 1}"
    first = prev
    for j in range(LAYERS):
        w = f"w{index}_{j}"
        weights.append(
            numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 16).astype(np.float32), w)
        )
        out = f"h{index}" if j == LAYERS - 1 else f"t{index}_{j}"
        nodes += [
            helper.make_node("MatMul", [prev, w], [f"m{index}_{j}"]),
            helper.make_node("Tanh", [f"m{index}_{j}"], [out]),
        ]
        prev = out
    _save(nodes, weights, first, prev, path)
    return [nodes, weights, first, prev]


def _save(nodes, weights, first: str, last: str, path: Path) -> None:
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", WIDTH]) for n in (first, last)]
    graph = helper.make_graph(nodes, path.stem, [io[0]], [io[1]], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))


def test_lost_stage_fails_fast_with_503_and_recovers(tmp_path, gateway):
    rng = np.random.default_rng(7)
    parts = [_stage(tmp_path / f"s{i}.onnx", i, rng) for i in range(3)]
    whole = tmp_path / "whole.onnx"
    nodes = [n for p in parts for n in p[0]]
    _save(nodes, [w for p in parts for w in p[1]], "x", parts[-1][3], whole)
    specs = [StageSpec(i, str(tmp_path / f"s{i}.onnx"), threads=1, exact=True) for i in range(3)]
    chain = start_local_chain(specs, workdir=tmp_path / "run")
    try:
        pipeline = DirectPipeline(
            "127.0.0.1", chain.ports[0], stages=3, result_port=chain.result_port, lost_grace_s=1.0
        )
        gw = gateway(
            pipeline, ModelInfo.from_onnx(whole, name="deep"), request_timeout_s=30.0, watch_after_s=0.1
        )
        client = GatewayClient(gw.url, timeout_s=60)
        client.wait_ready(30)
        reference = open_session(whole, 1, True)
        x = rng.standard_normal((4, WIDTH)).astype(np.float32)
        np.testing.assert_array_equal(client.infer({"x": x})["h2"], reference.run(None, {"x": x})[0])

        # a request slower than the watch interval on a healthy chain is NOT cut short
        big = rng.standard_normal((8000, WIDTH)).astype(np.float32)
        t0 = time.monotonic()
        out = client.infer({"x": big})["h2"]
        slow_s = time.monotonic() - t0
        np.testing.assert_array_equal(out, reference.run(None, {"x": big})[0])
        print(f"healthy request of {slow_s:.2f} s passed the watch (interval 0.1 s)")
        assert slow_s > 0.2  # long enough to have been probed at least once

        middle = chain.processes[1].pid
        os.kill(middle, signal.SIGSTOP)  # stage 1 stops answering, its connections stay open
        try:
            errors: list[tuple[float, BaseException]] = []

            def one() -> None:
                t = time.monotonic()
                try:
                    client.infer({"x": x})
                except StageUnavailable as exc:
                    errors.append((time.monotonic() - t, exc))

            threads = [threading.Thread(target=one) for _ in range(3)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(40)
            assert len(errors) == 3, errors
            took = max(t for t, _ in errors)
            print(f"503 after {took:.2f} s (deadline 30 s): {errors[0][1]}")
            assert took < 10.0  # watch 0.1 s + a 2 s health probe, far below the 30 s deadline
            assert "not ready" in str(errors[0][1])
            t = time.monotonic()
            with pytest.raises(StageUnavailable):  # known broken: refused at once
                client.infer({"x": x})
            assert time.monotonic() - t < 3.0
        finally:
            os.kill(middle, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:
            try:
                got = client.infer({"x": x})["h2"]
                break
            except StageUnavailable:
                assert time.monotonic() < deadline, (
                    "the gateway did not serve again after the stage came back"
                )
                time.sleep(0.3)
        np.testing.assert_array_equal(got, reference.run(None, {"x": x})[0])
    finally:
        chain.stop()
