"""DirectPipeline over a chain of real worker processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest
from runtime_models import heavy_specs, open_pipeline, reference, run

from layerline.errors import BadRequest, DeadlineExceeded, StageFailed, StageUnavailable
from layerline.runtime.api import Pipeline
from layerline.runtime.inprocess import InProcessPipeline
from layerline.runtime.launch import free_ports, start_local_chain
from layerline.runtime.pipeline import DirectPipeline


def batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


def test_chain_gives_the_in_process_outputs_and_per_stage_timings(three_stage_chain):
    chain, specs = three_stage_chain
    x = batch(4, 1)

    async def main():
        local = InProcessPipeline(specs)
        await local.start()
        expected = await local.infer({"x": x}, 5.0)
        pipe = await open_pipeline(chain)
        assert isinstance(pipe, Pipeline)
        try:
            result = await pipe.infer({"x": x}, 5.0)
        finally:
            await pipe.close()
        return expected, result

    expected, result = run(main())
    assert set(result.outputs) == {
        "z",
        "h",
    }  # z computed by stage 2, h forwarded from stage 0 through 1 and 2
    for name in ("z", "h"):
        np.testing.assert_array_equal(result.outputs[name], expected.outputs[name])
        np.testing.assert_allclose(result.outputs[name], reference(x)[name], rtol=1e-5, atol=1e-5)
    assert [t.stage for t in result.stages] == [0, 1, 2]
    assert all(t.compute_s > 0 and t.queue_s >= 0 and t.send_s >= 0 for t in result.stages)
    assert result.total_s >= sum(t.compute_s for t in result.stages)


def test_fifty_concurrent_requests_each_get_their_own_result(three_stage_chain):
    chain, _ = three_stage_chain
    inputs = [batch(2 * (1 + i % 3), 100 + i) for i in range(50)]

    async def main():
        pipe = await open_pipeline(chain, max_in_flight=16)
        try:
            t0 = time.monotonic()
            results = await asyncio.gather(*(pipe.infer({"x": x}, 10.0) for x in inputs))
            return results, time.monotonic() - t0
        finally:
            await pipe.close()

    results, elapsed = run(main())
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result.outputs["z"], reference(x)["z"], rtol=1e-5, atol=1e-5)
    assert elapsed < 10


def test_a_stage_that_raises_gives_stage_failed_and_the_chain_keeps_serving(three_stage_chain):
    chain, _ = three_stage_chain

    async def main():
        pipe = await open_pipeline(chain)
        try:
            with pytest.raises(StageFailed, match=r"stage 1 failed: .*cannot be reshaped") as info:
                await pipe.infer({"x": batch(3, 5)}, 5.0)  # odd batch: stage 1's Reshape to [-1, 4] fails
            good = await pipe.infer({"x": batch(2, 6)}, 5.0)
            mixed = await asyncio.gather(
                *(pipe.infer({"x": batch(1 + i, i)}, 5.0) for i in range(8)), return_exceptions=True
            )
            health = await pipe.health(2.0)
            return info.value, good, mixed, health
        finally:
            await pipe.close()

    error, good, mixed, health = run(main())
    assert error.http_status == 500
    np.testing.assert_allclose(good.outputs["z"], reference(batch(2, 6))["z"], rtol=1e-5, atol=1e-5)
    for i, outcome in enumerate(mixed):
        if (1 + i) % 2:
            assert isinstance(outcome, StageFailed), outcome
        else:
            np.testing.assert_allclose(
                outcome.outputs["z"], reference(batch(1 + i, i))["z"], rtol=1e-5, atol=1e-5
            )
    assert health.ready and "failed" in health.stages[1].detail


def test_bad_inputs_are_rejected_with_bad_request(three_stage_chain):
    chain, _ = three_stage_chain

    async def main():
        pipe = await open_pipeline(chain)
        try:
            with pytest.raises(BadRequest, match=r"stage 0 needs tensor\(s\) \['x'\].*\['y'\]"):
                await pipe.infer({"y": batch(2, 0)}, 5.0)
            with pytest.raises(BadRequest, match="dtype 'object'"):
                await pipe.infer({"x": np.array([None, 1], dtype=object)}, 5.0)
        finally:
            await pipe.close()

    run(main())


def test_health_reports_every_stage_ready(three_stage_chain):
    chain, _ = three_stage_chain

    async def main():
        pipe = await open_pipeline(chain)
        try:
            return await pipe.health(2.0)
        finally:
            await pipe.close()

    health = run(main())
    assert health.ready and [s.stage for s in health.stages] == [0, 1, 2]
    assert all(s.ready and f"stage {s.stage}: queue 0/8" in s.detail for s in health.stages)


def test_no_stage_0_fails_fast_with_stage_unavailable():
    (port,) = free_ports(1)

    async def main():
        pipe = DirectPipeline("127.0.0.1", port, stages=2, result_port=0)
        with pytest.raises(RuntimeError, match="start"):
            await pipe.infer({"x": batch(2, 0)}, 1.0)
        await pipe.start()
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(StageUnavailable, match=f"stage 0 at 127.0.0.1:{port} is not connected.*refused"):
            await pipe.infer({"x": batch(2, 0)}, 5.0)
        elapsed = time.monotonic() - t0
        health = await pipe.health(1.0)
        await pipe.close()
        return elapsed, health

    elapsed, health = run(main())
    assert elapsed < 0.1
    assert not health.ready and "stage 0" in health.detail and not health.stages[0].ready


def test_a_budget_spent_before_stage_0_is_reported_as_deadline_exceeded(three_stage_chain):
    chain, _ = three_stage_chain

    async def main():
        pipe = await open_pipeline(chain)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await pipe.infer({"x": batch(2, 0)}, 0.0001)
            return info.value, time.monotonic() - t0, await pipe.infer({"x": batch(2, 0)}, 5.0)
        finally:
            await pipe.close()

    error, elapsed, after = run(main())
    assert error.http_status == 504 and elapsed < 0.5
    assert after.outputs["z"].shape == (2, 3)


@pytest.fixture(scope="module")
def heavy_chain(tmp_path_factory):
    """Stage 1 takes 0.3 s or more for the heavy batch (50 GFLOP on one thread); (chain, heavy input)."""
    directory = tmp_path_factory.mktemp("heavy")
    specs = heavy_specs(directory, layers=24)
    heavy = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float32)
    chain = start_local_chain(specs, workdir=directory / "run")
    try:
        yield chain, heavy
    finally:
        chain.stop()


def test_a_deadline_expiring_in_a_mid_chain_queue_names_that_stage(heavy_chain):
    chain, heavy = heavy_chain
    light = np.ones((1, 512), np.float32)

    async def main():
        # Scale the timings to how long stage 1 takes for the heavy request on this machine right now.
        pipe = await open_pipeline(chain)
        try:
            compute = (await pipe.infer({"x": heavy}, 60.0)).stages[1].compute_s
            # The light request gets 0.3 x compute at the stages and 0.8 x compute at the gateway: it expires
            # in stage 1's queue behind the heavy one, and its ERROR has 0.5 x compute to come back.
            pipe.budget_margin_s = 0.5 * compute
            slow = asyncio.create_task(pipe.infer({"x": heavy}, 60.0))
            await asyncio.sleep(min(0.1, compute / 5))  # the heavy request reaches stage 1
            t0 = time.monotonic()
            timeout = 0.8 * compute
            with pytest.raises(DeadlineExceeded) as info:
                await pipe.infer({"x": light}, timeout)
            waited = time.monotonic() - t0
            heavy_result = await slow
            after = await pipe.infer({"x": light}, 30.0)
            return info.value, waited, timeout, heavy_result, after
        finally:
            await pipe.close()

    error, waited, timeout, heavy_result, after = run(main())
    assert "stage 1: deadline passed after" in str(error) and "waiting in its queue" in str(error), error
    assert waited <= timeout + 0.2
    assert heavy_result.outputs["y"].shape == heavy.shape
    assert after.outputs["y"].shape == (1, 512)


def test_a_result_that_comes_back_after_its_deadline_is_discarded(heavy_chain, caplog):
    chain, heavy = heavy_chain
    caplog.set_level(logging.DEBUG, logger="layerline.runtime.pipeline")

    def discarded() -> bool:
        return any("discarding" in r.getMessage() for r in caplog.records)

    async def main():
        pipe = await open_pipeline(chain)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="got no result within"):
                await pipe.infer({"x": heavy}, 0.1)  # stage 1 still computes when the gateway gives up
            waited = time.monotonic() - t0
            for _ in range(500):  # stage 1's late answer (its budget ran out during compute) comes back
                if discarded():
                    break
                await asyncio.sleep(0.01)
            after = await pipe.infer({"x": heavy[:2]}, 30.0)
            return waited, after, await pipe.health(2.0)
        finally:
            await pipe.close()

    waited, after, health = run(main())
    assert waited <= 0.1 + 0.2
    assert discarded()
    assert after.outputs["y"].shape == (2, 512) and health.ready
