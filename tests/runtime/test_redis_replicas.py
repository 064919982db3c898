"""Replicas per stage (competing consumers): launching, scaling up and down, scaling to zero."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time

import pytest
from redis_support import (
    NEEDS_REDIS,
    chain_specs,
    check_output,
    command,
    request_input,
    steady_stream,
    wait_ready,
)
from runtime_models import run

from layerline.errors import DeadlineExceeded
from layerline.runtime.launch import LocalChain, free_ports, launch_chain
from layerline.runtime.redis_launch import start_redis_chain
from layerline.runtime.redis_pipeline import RedisPipeline
from layerline.runtime.redis_server import start_redis_server
from layerline.runtime.scaling import ReplicaScaler, parse_replicas
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.worker import WorkerConfig


def test_parse_replicas():
    assert parse_replicas(None, 3) == [1, 1, 1]
    assert parse_replicas("2", 3) == [2, 2, 2] == parse_replicas(2, 3)
    assert parse_replicas("1, 2,1", 3) == [1, 2, 1] == parse_replicas([1, 2, 1], 3)
    assert parse_replicas("0", 1) == [0]
    for bad, match in (("1,2", "2 counts for 3 stages"), ("x", "one count for every stage"), ("-1", ">= 0")):
        with pytest.raises(ValueError, match=match):
            parse_replicas(bad, 3)


def test_tcp_stages_refuse_replicas_before_starting_anything(tmp_path):
    configs = [WorkerConfig(StageSpec(0, "m.onnx")), WorkerConfig(StageSpec(1, "m.onnx"))]
    with pytest.raises(ValueError, match="TCP transport, which runs exactly one process"):
        launch_chain(configs, "127.0.0.1", 0, workdir=tmp_path, replicas=[1, 2])
    with pytest.raises(ValueError, match="got 1 replica counts for 2 stages"):
        launch_chain(configs, "127.0.0.1", 0, workdir=tmp_path, replicas=[1])
    chain = LocalChain("127.0.0.1", configs, 0, tmp_path, replica_sets=[{}, {}])
    assert isinstance(chain, ReplicaScaler) and chain.stage_count == 2
    with pytest.raises(ValueError, match="TCP transport"):
        chain.scale(1, 3)
    with pytest.raises(ValueError, match="does not exist"):
        chain.scale(2, 1)
    assert not list(tmp_path.glob("*.log"))  # nothing was started


def _pending_of(url: str, pid: int) -> list:
    """The entries of stage 1 delivered to the replica with this pid and not yet handed on."""
    return command(url, "XPENDING", "rep:s1", "stage1", "-", "+", 100, f"{socket.gethostname()}-{pid}")


def _served(log: str) -> int:
    return sum(int(n) for n in re.findall(r"stopped \(served (\d+), failed 0\)", log))


@NEEDS_REDIS[0]
@NEEDS_REDIS[1]
@pytest.mark.slow
def test_replicas_share_a_stage_and_scale_up_down_and_to_zero(tmp_path):
    server = start_redis_server(free_ports(1)[0], tmp_path / "redis")
    chain = start_redis_chain(
        chain_specs(tmp_path),
        server.url,
        prefix="rep",
        replicas=[1, 2, 1],
        claim_idle_ms=4000,
        workdir=tmp_path / "w",
    )

    async def go():
        pipe = RedisPipeline(server.url, stages=3, prefix="rep", max_in_flight=512)
        await pipe.start()
        try:
            await wait_ready(pipe)
            assert [chain.replicas(k) for k in range(3)] == [1, 2, 1]
            loads = await pipe.stage_loads()
            assert [load.live for load in loads] == [1, 2, 1]

            async def infer(i):
                return (await pipe.infer({"x": request_input(i)}, 20.0)).outputs

            # a steady stream; meanwhile stage 1 goes from 2 to 3 replicas and back to 1. The two that
            # stop are frozen first until they hold entries, so that their graceful stop has to drain
            async def scale_midway():
                await asyncio.sleep(0.4)
                await asyncio.to_thread(chain.scale, 1, 3)
                assert chain.replicas(1) == 3
                await asyncio.sleep(0.6)
                victims = chain.replica_processes(1)[1:]
                for proc in victims:
                    os.kill(proc.pid, signal.SIGSTOP)
                deadline = time.monotonic() + 5.0
                while sum(len(_pending_of(server.url, proc.pid)) for proc in victims) < 2:
                    assert time.monotonic() < deadline, "the frozen replicas got no entries"
                    await asyncio.sleep(0.01)
                stopping = asyncio.create_task(asyncio.to_thread(chain.scale, 1, 1))
                await asyncio.sleep(0.3)  # SIGTERM is sent and pending
                for proc in victims:
                    os.kill(proc.pid, signal.SIGCONT)
                await stopping

            stream, _ = await asyncio.gather(steady_stream(infer, 450, 150.0), scale_midway())
            for o in stream.outcomes:
                assert o.error is None and o.completions == 1, (o.index, o.error)
                check_output(o.result, o.index)
            assert chain.replicas(1) == 1
            await asyncio.sleep(0.3)  # a duplicate, if any, would arrive now
            assert pipe.duplicate_replies == 0

            # scale to zero: requests wait in the stream (health says so) and are served after scaling up
            await asyncio.to_thread(chain.scale, 1, 0)
            waiting = [asyncio.create_task(infer(1000 + i)) for i in range(5)]
            await asyncio.sleep(0.3)
            report = await pipe.health(1.0)
            assert not report.ready and "no live consumer on rep:s1" in report.detail
            assert (await pipe.stage_loads())[1].waiting == 5
            with pytest.raises(DeadlineExceeded):
                await pipe.infer({"x": request_input(0)}, 0.2)
            await asyncio.to_thread(chain.scale, 1, 1)
            for i, task in enumerate(waiting):
                check_output(await task, 1000 + i)
        finally:
            await pipe.close()

    try:
        run(go(), timeout_s=90.0)
        log = chain.log_text(1)
        # the stopped replicas drained what they held: nothing was left for the others to take over
        assert re.search(r"draining: finishing the \d+ request", log)
        assert "took over request" not in log
        stopped = [chain.workdir / f"stage1-r{s}.log" for s in (1, 2)]
        assert all(_served(p.read_text()) > 0 for p in stopped), "a replica got no work"
        assert command(server.url, "XLEN", "rep:s1") == 0
    finally:
        chain.stop()
        server.stop()
