"""Helpers of the Redis runtime tests: skip marks, a command helper, readiness, a steady request stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import helper
from runtime_models import save_model

from layerline.runtime.redis_resp import RespConnection
from layerline.runtime.redis_server import redis_server_binary
from layerline.runtime.stagespec import StageSpec

NEEDS_REDIS = [
    pytest.mark.redis,
    pytest.mark.skipif(
        redis_server_binary() is None, reason="redis-server is not installed (apt-get install redis-server)"
    ),
]


def command(url: str, *args: Any) -> Any:
    """Run one Redis command, blocking (from test code, inside an event loop or not)."""

    async def go() -> Any:
        conn = RespConnection(url)
        try:
            return await asyncio.wait_for(conn.execute(*args), 10.0)
        finally:
            conn.close()

    with ThreadPoolExecutor(1) as pool:  # its own event loop, whether or not the caller runs one
        return pool.submit(asyncio.run, go()).result()


def keys(url: str, pattern: str) -> list[str]:
    return sorted(k.decode() for k in command(url, "KEYS", pattern))


async def wait_ready(pipe: Any, timeout_s: float = 20.0) -> None:
    """Until every stage of ``pipe`` has a live consumer."""
    deadline = time.monotonic() + timeout_s
    while not (report := await pipe.health(1.0)).ready:
        assert time.monotonic() < deadline, f"not ready: {report}"
        await asyncio.sleep(0.05)


@dataclass
class Outcome:
    """One request of a :func:`steady_stream`: when it was due, when it ended, and how."""

    index: int
    due: float
    ended: float = 0.0
    result: Any = None
    error: BaseException | None = None
    completions: int = 0

    @property
    def latency_s(self) -> float:
        return self.ended - self.due


@dataclass
class Stream:
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0


async def steady_stream(
    infer: Callable[[int], Any], count: int, rate_per_s: float, stream: Stream | None = None
) -> Stream:
    """Issue ``count`` requests at a fixed rate (open loop: a slow answer does not delay the next)."""
    stream = stream or Stream()
    stream.started = time.monotonic()
    stream.outcomes = [Outcome(i, stream.started + i / rate_per_s) for i in range(count)]

    async def one(outcome: Outcome) -> None:
        await asyncio.sleep(max(0.0, outcome.due - time.monotonic()))
        try:
            outcome.result = await infer(outcome.index)
        except Exception as exc:  # recorded and checked by the test
            outcome.error = exc
        outcome.completions += 1
        outcome.ended = time.monotonic()

    await asyncio.gather(*(one(o) for o in stream.outcomes))
    return stream


def latency_report(label: str, affected: list[Outcome], others: list[Outcome]) -> str:
    """p50/max latency (ms) of the affected requests vs the others, as one printable line."""

    def stats(outcomes: list[Outcome]) -> str:
        if not outcomes:
            return "n=0"
        ms = np.array([o.latency_s * 1000 for o in outcomes])
        return f"n={len(ms)} p50={np.median(ms):.1f} ms max={ms.max():.1f} ms"

    return f"{label}: affected {stats(affected)}; unaffected {stats(others)}"


# -- a 3-stage model whose middle stage takes about a millisecond, outputs checkable per request --------

WIDTH = 512
LAYERS = 48
_RNG = np.random.default_rng(11)
_W0 = (_RNG.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
_W1 = (_RNG.standard_normal((WIDTH, WIDTH)) * 1.2 / np.sqrt(WIDTH)).astype(np.float32)
_W2 = (_RNG.standard_normal((WIDTH, 8)) / np.sqrt(WIDTH)).astype(np.float32)


def chain_specs(directory: Path) -> list[StageSpec]:
    """x[B,512] → h = x W0 | y = tanh(… tanh(h W1) … W1) (``LAYERS`` times) | z = y W2 (and x passed on)."""
    s0 = save_model(
        directory / "c0.onnx",
        [helper.make_node("MatMul", ["x", "W0"], ["h"])],
        [("x", ["B", WIDTH])],
        [("h", ["B", WIDTH])],
        {"W0": _W0},
    )
    nodes, prev = [], "h"
    for i in range(LAYERS):
        nodes += [
            helper.make_node("MatMul", [prev, "W1"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]),
        ]
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    s1 = save_model(directory / "c1.onnx", nodes, [("h", ["B", WIDTH])], [("y", ["B", WIDTH])], {"W1": _W1})
    s2 = save_model(
        directory / "c2.onnx",
        [helper.make_node("MatMul", ["y", "W2"], ["z"])],
        [("y", ["B", WIDTH])],
        [("z", ["B", 8])],
        {"W2": _W2},
    )
    return [
        StageSpec(0, s0, forward=("x",)),
        StageSpec(1, s1, forward=("x",)),
        StageSpec(2, s2, forward=("x",)),
    ]


def request_input(index: int, batch: int = 2) -> np.ndarray:
    """Request ``index``'s input; ``x[0, 0] == index`` identifies it in any stream entry."""
    x = np.random.default_rng(1000 + index).standard_normal((batch, WIDTH)).astype(np.float32)
    x[0, 0] = index
    return x


def expected_output(x: np.ndarray) -> np.ndarray:
    y = x.astype(np.float64) @ _W0
    for _ in range(LAYERS):
        y = np.tanh(y @ _W1)
    return y @ _W2


def check_output(outputs: dict, index: int) -> None:
    x = request_input(index)
    np.testing.assert_array_equal(outputs["x"], x)
    np.testing.assert_allclose(outputs["z"], expected_output(x), rtol=1e-3, atol=1e-4)
