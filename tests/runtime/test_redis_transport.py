"""The Redis Streams transport with a real redis-server and real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
from redis_support import NEEDS_REDIS, command, keys, wait_ready
from runtime_models import FEAT, reference, run, three_stage_specs

from layerline.errors import DeadlineExceeded, StageFailed
from layerline.runtime.launch import free_ports
from layerline.runtime.redis_entries import DEFAULT_BLOB_MIN_BYTES
from layerline.runtime.redis_launch import start_redis_chain
from layerline.runtime.redis_pipeline import RedisPipeline
from layerline.runtime.redis_server import start_redis_server
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.worker import WorkerConfig

pytestmark = NEEDS_REDIS


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = start_redis_server(free_ports(1)[0], tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return three_stage_specs(tmp_path_factory.mktemp("models"))


def _check(got: dict, x: np.ndarray) -> None:
    for name, expected in reference(x).items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5)


def test_worker_config_keeps_tcp_default_and_round_trips_redis(tmp_path):
    spec = StageSpec(1, "m.onnx")
    tcp = WorkerConfig(spec)
    assert "redis" not in tcp.to_json() and WorkerConfig.from_json(tcp.to_json()) == tcp
    cfg = WorkerConfig(
        spec, transport="redis", redis_url="redis://127.0.0.1:1/0", stages=3, max_retries=1, blob_min_bytes=7
    )
    assert WorkerConfig.from_json(cfg.to_json()) == cfg
    assert WorkerConfig(spec).blob_min_bytes == DEFAULT_BLOB_MIN_BYTES
    with pytest.raises(ValueError, match="stages > the stage index"):
        WorkerConfig(spec, transport="redis", redis_url="redis://x", stages=1)


@pytest.mark.parametrize("blob_min", [1 << 40, 0], ids=["inline", "blobs"])
def test_three_stages_match_reference_and_health(redis_url, specs, tmp_path, blob_min):
    prefix = f"eq{blob_min}"

    async def go():
        pipe = RedisPipeline(redis_url, stages=3, prefix=prefix, blob_min_bytes=blob_min)
        await pipe.start()
        try:
            report = await pipe.health(1.0)
            assert not report.ready and "no live consumer" in report.detail
            with pytest.raises(DeadlineExceeded, match="no answer"):  # queued, nobody consumes yet
                await pipe.infer({"x": np.ones((2, FEAT), np.float32)}, 0.3)
            with start_redis_chain(
                specs, redis_url, prefix=prefix, workdir=tmp_path, blob_min_bytes=blob_min
            ):
                await wait_ready(pipe)
                xs = [
                    np.random.default_rng(i).standard_normal((2 + i % 3 * 2, FEAT)).astype(np.float32)
                    for i in range(20)
                ]
                results = await asyncio.gather(*(pipe.infer({"x": x}, 10.0) for x in xs))
                for x, result in zip(xs, results, strict=True):
                    _check(result.outputs, x)
                    assert [t.stage for t in result.stages] == [0, 1, 2]
                assert pipe.duplicate_replies == 0
            # stages answered, acknowledged and deleted their entries (nothing pending, the
            # request queued before any worker ran was served late and discarded); no blob is left
            assert [command(redis_url, "XLEN", f"{prefix}:s{k}") for k in range(3)] == [0, 0, 0]
            assert keys(redis_url, f"{prefix}:b:*") == []
        finally:
            await pipe.close()

    run(go())


def test_killed_middle_stage_is_taken_over_exactly_once(redis_url, specs, tmp_path):
    """With every frame a blob: a take-over also finds the blob of the entry it takes over."""
    chain = start_redis_chain(
        specs, redis_url, prefix="kill", claim_idle_ms=300, workdir=tmp_path, blob_min_bytes=0
    )

    async def go():
        pipe = RedisPipeline(redis_url, stages=3, prefix="kill", max_in_flight=128, blob_min_bytes=0)
        await pipe.start()
        try:
            await wait_ready(pipe)
            xs = [np.full((2, FEAT), i / 10.0, np.float32) for i in range(100)]
            tasks = [asyncio.create_task(pipe.infer({"x": x}, 30.0)) for x in xs]
            victim = chain.processes[1]
            held: list = []
            deadline = time.monotonic() + 10.0
            while not held and time.monotonic() < deadline and not all(t.done() for t in tasks):
                await asyncio.sleep(0.002)
                if command(redis_url, "XPENDING", "kill:s1", "stage1")[0]:
                    os.kill(victim.pid, signal.SIGSTOP)  # freeze it holding entries, then kill it
                    held = command(redis_url, "XPENDING", "kill:s1", "stage1", "-", "+", 1000)
                    if not held:
                        os.kill(victim.pid, signal.SIGCONT)
            chain.kill(1, signal.SIGKILL)
            chain.restart(1)  # a new process: a new consumer name
            results = await asyncio.gather(*tasks)
            for x, result in zip(xs, results, strict=True):
                _check(result.outputs, x)
            await asyncio.sleep(0.3)  # a duplicate, if any, would arrive now
            assert pipe.duplicate_replies == 0
            return held
        finally:
            await pipe.close()

    try:
        held = run(go())
        assert held, "the killed worker held no entries: the test did not exercise the take-over"
        assert "took over request" in chain.log_text(1)
        assert [command(redis_url, "XLEN", f"kill:s{k}") for k in range(3)] == [0, 0, 0]
        assert command(redis_url, "XPENDING", "kill:s1", "stage1")[0] == 0
        assert keys(redis_url, "kill:b:*") == []  # every blob consumed and deleted
    finally:
        chain.stop()


def test_poison_request_is_dead_lettered_and_the_next_succeeds(redis_url, specs, tmp_path):
    chain = start_redis_chain(
        specs, redis_url, prefix="poison", claim_idle_ms=150, max_retries=2, workdir=tmp_path
    )

    async def go():
        pipe = RedisPipeline(redis_url, stages=3, prefix="poison")
        await pipe.start()
        try:
            await wait_ready(pipe)
            odd = np.ones((1, FEAT), np.float32)  # stage 1 rejects an odd batch (a Reshape to [-1, 4])
            good = np.ones((2, FEAT), np.float32)
            poison = asyncio.create_task(pipe.infer({"x": odd}, 20.0))
            _check((await pipe.infer({"x": good}, 5.0)).outputs, good)  # not blocked by the poison
            with pytest.raises(StageFailed, match=r"dead-letter stream poison:dead after 3 deliveries"):
                await poison
            _check((await pipe.infer({"x": good}, 5.0)).outputs, good)
        finally:
            await pipe.close()

    try:
        run(go())
        dead = command(redis_url, "XRANGE", "poison:dead", "-", "+")
        assert len(dead) == 1
        fields = dict(zip(dead[0][1][::2], dead[0][1][1::2], strict=True))
        assert fields[b"stage"] == b"1" and fields[b"deliveries"] == b"3"
        assert b"stage 1 failed" in fields[b"error"] and fields[b"f"].startswith(b"LLF1")
        assert command(redis_url, "XLEN", "poison:s1") == 0
    finally:
        chain.stop()
