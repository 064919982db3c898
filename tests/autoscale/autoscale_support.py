"""A sliced model whose middle stage does far more work than the others, and a replica-count sampler."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerline.autoscale.local_scaler import LocalReplicaScaler
from layerline.engines.stages import DeployTarget
from layerline.graph import slice_model
from layerline.runtime.redis_server import redis_server_binary

NEEDS_REDIS = [
    pytest.mark.redis,
    pytest.mark.skipif(
        redis_server_binary() is None, reason="redis-server is not installed (apt-get install redis-server)"
    ),
]

WIDTH = 512
LAYERS = 16
FEATURES = 64
ROWS = 128  # rows per request: the middle stage runs 128 x 512 x 512 x 16 MACs (~1 GFLOP, ~10-15 ms)


def build_slow_middle(directory: Path) -> tuple[Path, DeployTarget]:
    """x[N,64] → MatMul+Tanh → LAYERS × (MatMul 512x512 + Tanh) → MatMul → y[N,10], sliced; the target
    puts the first block in stage 0, all the square layers in stage 1 and the last block in stage 2."""
    rng = np.random.default_rng(3)
    w0 = (rng.standard_normal((FEATURES, WIDTH)) / 8).astype(np.float32)
    w1 = (rng.standard_normal((WIDTH, WIDTH)) * 1.5 / np.sqrt(WIDTH)).astype(np.float32)
    w2 = (rng.standard_normal((WIDTH, 10)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Tanh", ["h0"], ["a0"])]
    prev = "a0"
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [prev, "w1"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(helper.make_node("MatMul", [prev, "w2"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slowmid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, n) for w, n in ((w0, "w0"), (w1, "w1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "slowmid.onnx"
    onnx.save(model, path)
    manifest = slice_model(path, directory / "slowmid.sliced", name="slowmid")
    n = len(manifest.blocks)
    assert n == LAYERS + 2, n
    ranges = ((0, 1), (1, n - 1), (n - 1, n))
    return path, DeployTarget(directory / "slowmid.sliced", ranges, ("local",) * 3, "balanced")


def sample_input(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((ROWS, FEATURES)).astype(np.float32)}


@dataclass
class ReplicaTimeline:
    """Replica counts per stage of a deployment, sampled every ``period_s`` in a thread."""

    name: str
    period_s: float = 0.1
    samples: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ReplicaTimeline:
        scaler = LocalReplicaScaler(self.name)
        stages = scaler.stage_count
        t0 = time.monotonic()

        def loop() -> None:
            while not self._stop.is_set():
                counts = tuple(scaler.replicas(k) for k in range(stages))
                self.samples.append((time.monotonic() - t0, counts))
                self._stop.wait(self.period_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def latest(self) -> tuple[int, ...]:
        return self.samples[-1][1] if self.samples else ()

    def changes(self) -> list[tuple[float, tuple[int, ...]]]:
        """The samples where the counts changed (and the first)."""
        out: list[tuple[float, tuple[int, ...]]] = []
        for t, counts in self.samples:
            if not out or out[-1][1] != counts:
                out.append((round(t, 2), counts))
        return out
