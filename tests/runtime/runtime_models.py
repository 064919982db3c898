"""Tiny stage models built inline, and helpers to run chains of real worker processes (tests/runtime)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerline.runtime.launch import LocalChain
from layerline.runtime.pipeline import DirectPipeline
from layerline.runtime.stagespec import StageSpec

FEAT = 6
RNG = np.random.default_rng(7)
W0 = RNG.standard_normal((FEAT, FEAT)).astype(np.float32)
W1 = RNG.standard_normal((FEAT, FEAT)).astype(np.float32)
WS = RNG.standard_normal((FEAT, FEAT)).astype(np.float32)
W2 = RNG.standard_normal((FEAT, 3)).astype(np.float32)


def save_model(path: Path, nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> str:
    """Write a one-graph ONNX model (opset 17); returns its path as a string."""
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def three_stage_specs(directory: Path) -> list[StageSpec]:
    """x[B,6] → h = relu(x W0) | y = relu(reshape(h) W1 + x Ws) | z = y W2; final outputs z and h.

    Stage 1 reshapes h to [-1, 4] and back, which onnxruntime rejects for an odd batch size.
    """
    s0 = save_model(
        directory / "s0.onnx",
        [helper.make_node("MatMul", ["x", "W0"], ["m0"]), helper.make_node("Relu", ["m0"], ["h"])],
        [("x", ["B", FEAT])],
        [("h", ["B", FEAT])],
        {"W0": W0},
    )
    s1 = save_model(
        directory / "s1.onnx",
        [
            helper.make_node("Reshape", ["h", "shape4"], ["h4"]),
            helper.make_node("Reshape", ["h4", "shape6"], ["h6"]),
            helper.make_node("MatMul", ["h6", "W1"], ["a"]),
            helper.make_node("MatMul", ["x", "WS"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [("h", ["B", FEAT]), ("x", ["B", FEAT])],
        [("y", ["B", FEAT])],
        {"W1": W1, "WS": WS, "shape4": np.array([-1, 4]), "shape6": np.array([-1, FEAT])},
    )
    s2 = save_model(
        directory / "s2.onnx",
        [helper.make_node("MatMul", ["y", "W2"], ["z"])],
        [("y", ["B", FEAT])],
        [("z", ["B", 3])],
        {"W2": W2},
    )
    return [
        StageSpec(0, s0, forward=("x",)),
        StageSpec(1, s1, forward=("h",)),
        StageSpec(2, s2, forward=("h",)),
    ]


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """The three-stage model in numpy (float64 accumulations; compare with a tolerance)."""
    h = np.maximum(x @ W0, 0)
    y = np.maximum(h @ W1 + x @ WS, 0)
    return {"z": y @ W2, "h": h}


def heavy_specs(directory: Path, layers: int = 12, width: int = 512) -> list[StageSpec]:
    """Stage 0 cheap; stage 1 a stack of ``layers`` [width x width] MatMuls (cost grows with the batch)."""
    w = (RNG.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    s0 = save_model(
        directory / "cheap.onnx",
        [helper.make_node("Relu", ["x"], ["h"])],
        [("x", ["B", width])],
        [("h", ["B", width])],
        {},
    )
    nodes, prev = [], "h"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"m{i}"]))
        prev = f"m{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    s1 = save_model(directory / "heavy.onnx", nodes, [("h", ["B", width])], [("y", ["B", width])], {"W": w})
    return [StageSpec(0, s0), StageSpec(1, s1)]


def identity_spec(directory: Path, index: int = 0) -> StageSpec:
    path = save_model(
        directory / f"identity{index}.onnx",
        [helper.make_node("Identity", ["x"], ["y"])],
        [("x", ["N"])],
        [("y", ["N"])],
        {},
    )
    return StageSpec(index, path)


def run(coro, timeout_s: float = 60.0):
    """Run a coroutine to completion with a hard bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def open_pipeline(chain: LocalChain, **kwargs) -> DirectPipeline:
    """A started DirectPipeline for ``chain``, once every stage answers a health probe."""
    pipe = DirectPipeline(
        chain.host, chain.ports[0], stages=len(chain.configs), result_port=chain.result_port, **kwargs
    )
    await pipe.start()
    report = await pipe.wait_ready(15.0)
    if not report.ready:
        await pipe.close()  # frees the result port for the next test
        raise AssertionError(f"the chain did not become ready: {report}")
    return pipe
