"""Workers killed with SIGKILL: requests fail fast or within their deadline, health names the stage, and
the chain heals when the worker comes back on the same port."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
from runtime_models import open_pipeline, reference, run, three_stage_specs

from layerline.errors import DeadlineExceeded, StageUnavailable
from layerline.runtime.launch import start_local_chain

TIMEOUT = 2.0
MARGIN = 0.5


def batch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 6)).astype(np.float32)


async def timed(pipe, seed: int) -> tuple[object, float]:
    """(result or the exception, seconds it took)."""
    t0 = time.monotonic()
    try:
        outcome: object = await pipe.infer({"x": batch(seed)}, TIMEOUT)
    except (StageUnavailable, DeadlineExceeded) as exc:
        outcome = exc
    return outcome, time.monotonic() - t0


async def fails_fast(pipe, seconds: float = 5.0):
    """Once the chain has noticed a failure (some request failed), the next request's outcome and time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        outcome, took = await timed(pipe, 0)
        assert took <= TIMEOUT + MARGIN, (outcome, took)
        if isinstance(outcome, Exception):
            return await timed(pipe, 0)
        await asyncio.sleep(0.01)
    raise AssertionError("the chain kept answering after a worker was killed")


@pytest.mark.slow
def test_killing_and_restarting_workers(tmp_path):
    chain = start_local_chain(three_stage_specs(tmp_path), workdir=tmp_path / "run")

    async def main():
        pipe = await open_pipeline(chain)
        try:
            assert not isinstance((await timed(pipe, 1))[0], Exception)

            # A stream of requests is in flight when the middle worker is killed.
            stream = [asyncio.create_task(timed(pipe, i)) for i in range(40)]
            await asyncio.sleep(0.005)
            chain.kill(1, signal.SIGKILL)
            outcomes = await asyncio.gather(*stream)
            for outcome, took in outcomes:
                assert took <= TIMEOUT + MARGIN, (outcome, took)

            # New requests fail fast: stage 0 answers that it cannot reach stage 1.
            error, took = await fails_fast(pipe)
            assert isinstance(error, StageUnavailable) and took < 0.5, (error, took)
            assert "stage 0 cannot reach its downstream" in str(error)
            health = await pipe.health(1.0)
            assert not health.ready and health.stages[0].ready and not health.stages[1].ready
            assert (
                "unreachable" in health.stages[1].detail and "stage 0 cannot reach" in health.stages[1].detail
            )

            # Same port, new process: the chain heals by itself.
            chain.restart(1)
            health = await pipe.wait_ready(10.0)
            assert health.ready, health
            x = batch(7)
            result = await pipe.infer({"x": x}, TIMEOUT)
            np.testing.assert_allclose(result.outputs["z"], reference(x)["z"], rtol=1e-5, atol=1e-5)

            # Stage 0 itself: the gateway sees its own connection drop and fails fast.
            chain.kill(0, signal.SIGKILL)
            error, took = await fails_fast(pipe)
            assert isinstance(error, StageUnavailable) and took < 0.1, (error, took)
            assert "stage 0 at 127.0.0.1" in str(error)
            assert not (await pipe.health(1.0)).ready
            chain.restart(0)
            assert (await pipe.wait_ready(10.0)).ready
            result = await pipe.infer({"x": x}, TIMEOUT)
            np.testing.assert_allclose(result.outputs["z"], reference(x)["z"], rtol=1e-5, atol=1e-5)

            # The last stage: its results cannot reach the gateway's result listener... and then can again.
            chain.kill(2, signal.SIGKILL)
            error, took = await fails_fast(pipe)
            assert isinstance(error, StageUnavailable) and took < 0.5 and "stage 1 cannot reach" in str(error)
            chain.restart(2)
            assert (await pipe.wait_ready(10.0)).ready
            return outcomes
        finally:
            await pipe.close()

    try:
        outcomes = run(main(), timeout_s=90)
    finally:
        chain.stop()
    kinds = {type(o).__name__ for o, _ in outcomes}
    assert kinds <= {"InferResult", "StageUnavailable", "DeadlineExceeded"}, kinds


def test_a_stalled_worker_never_makes_a_request_outlive_its_deadline(three_stage_chain):
    chain, _ = three_stage_chain
    stalled = chain.processes[1]

    async def main():
        pipe = await open_pipeline(chain)
        try:
            os.kill(stalled.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                outcomes = await asyncio.gather(
                    *(pipe.infer({"x": np.ones((2, 6), np.float32)}, 0.5) for _ in range(20)),
                    return_exceptions=True,
                )
                took = time.monotonic() - t0
                health = await pipe.health(0.3)
            finally:
                os.kill(stalled.pid, signal.SIGCONT)
            recovered = await pipe.wait_ready(10.0)
            after = await pipe.infer({"x": batch(3)}, 5.0)
            return outcomes, took, health, recovered, after
        finally:
            await pipe.close()

    outcomes, took, health, recovered, after = run(main())
    assert all(isinstance(o, DeadlineExceeded) for o in outcomes), outcomes
    assert took <= 0.5 + MARGIN
    assert not health.ready and "did not come back" in health.detail
    assert recovered.ready
    np.testing.assert_allclose(after.outputs["z"], reference(batch(3))["z"], rtol=1e-5, atol=1e-5)
