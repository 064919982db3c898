"""Faults under a steady stream: a replica killed or frozen, Redis restarted with and without its data.

One real redis-server (restarted by the tests on the same port and directory), one chain of real worker
processes shared by the module: 3 stages, 2 replicas of the middle one (which computes about a
millisecond per request). Each test sends a steady, bounded stream (fixed rate, open loop) of requests
whose outputs are checked one by one, injects its fault mid-stream, and prints the latency of the
requests the fault hit against the others (``pytest -s`` shows it).

Redis runs with ``appendonly yes`` and ``appendfsync always`` while it should keep its data: the tests
kill it with SIGKILL, and only ``always`` guarantees that every write it acknowledged is in the file
(``everysec`` may lose the last second, so a request added in that second could only end at its
deadline; see docs/redis.md).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis_support import (
    NEEDS_REDIS,
    Outcome,
    chain_specs,
    check_output,
    command,
    latency_report,
    request_input,
    steady_stream,
    wait_ready,
)
from runtime_models import run

from layerline.errors import StageUnavailable
from layerline.runtime.framing import decode
from layerline.runtime.launch import LocalChain, free_ports
from layerline.runtime.redis_launch import start_redis_chain
from layerline.runtime.redis_pipeline import RedisPipeline
from layerline.runtime.redis_server import RedisServer, start_redis_server

pytestmark = [*NEEDS_REDIS, pytest.mark.slow]

PREFIX = "ft"
CLAIM_IDLE_MS = 1000
COUNT, RATE = 500, 250.0  # requests, per second: a 2 s stream
TIMEOUT_S = 20.0


@dataclass
class Rig:
    port: int
    directory: Path
    server: RedisServer
    chain: LocalChain

    @property
    def url(self) -> str:
        return self.server.url

    def restart_redis(self, *, kill: bool, appendonly: bool) -> float:
        """Stop Redis (SIGKILL or SIGTERM) and start it again on the same port; seconds it was away."""
        t0 = time.monotonic()
        if kill:
            self.server.process.kill()
            self.server.process.wait()
        else:
            self.server.stop()
        self.start_redis(appendonly=appendonly)
        return time.monotonic() - t0

    def start_redis(self, *, appendonly: bool) -> None:
        self.server = start_redis_server(
            self.port, self.directory, appendonly=appendonly, appendfsync="always"
        )

    async def crash_with_requests_in_flight(self, pipe: RedisPipeline, appendonly: bool) -> dict[str, float]:
        """Freeze the last stage for 50 ms (requests pile up in flight), SIGKILL Redis, resume the stage,
        start Redis again; when it went down and when it was back."""
        last = self.chain.replica_processes(2)[0]
        os.kill(last.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.05)
            assert pipe.in_flight > 0
            down = time.monotonic()
            self.server.process.kill()
            self.server.process.wait()
        finally:
            os.kill(last.pid, signal.SIGCONT)
        await asyncio.to_thread(self.start_redis, appendonly=appendonly)
        return {"down": down, "up": time.monotonic()}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults")
    port = free_ports(1)[0]
    server = start_redis_server(port, directory / "redis", appendonly=True, appendfsync="always")
    chain = start_redis_chain(
        chain_specs(directory),
        server.url,
        prefix=PREFIX,
        replicas=[1, 2, 1],
        claim_idle_ms=CLAIM_IDLE_MS,
        workdir=directory / "workers",
    )
    rig = Rig(port, directory / "redis", server, chain)
    try:
        yield rig
    finally:
        chain.stop()
        rig.server.stop()


def _consumer(pid: int) -> str:
    return f"{socket.gethostname()}-{pid}"


def _held_by(url: str, pid: int) -> list[bytes]:
    """Ids of the stage-1 entries delivered to that replica and not handed on yet."""
    return [p[0] for p in command(url, "XPENDING", f"{PREFIX}:s1", "stage1", "-", "+", 100, _consumer(pid))]


def _indices(url: str, ids: list[bytes]) -> set[int]:
    """The request numbers (``x[0, 0]``) of stage-1 entries."""
    found = set()
    for entry_id in ids:
        for _id, fields in command(url, "XRANGE", f"{PREFIX}:s1", entry_id, entry_id):
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            data = values.get(b"f") or command(url, "GET", values[b"b"])
            found.add(int(decode(data).tensors["x"][0, 0]))
    return found


async def _freeze_holding(url: str, pid: int, want: int = 2, patience_s: float = 1.0) -> list[bytes]:
    """SIGSTOP the replica at a moment it holds ``want`` entries (after ``patience_s``, one will do)."""
    t0 = time.monotonic()
    while time.monotonic() < t0 + 10.0:
        os.kill(pid, signal.SIGSTOP)
        held = _held_by(url, pid)
        if len(held) >= want or (held and time.monotonic() > t0 + patience_s):
            return held
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.002)
    raise AssertionError("the replica never held an entry")


async def _stream(rig: Rig, fault) -> tuple[list[Outcome], RedisPipeline, object]:
    """The steady stream with ``fault(pipe)`` running beside it; outcomes, the pipeline, fault's result."""
    pipe = RedisPipeline(rig.url, stages=3, prefix=PREFIX, max_in_flight=4 * COUNT)
    await pipe.start()
    try:
        await wait_ready(pipe)

        async def infer(i: int):
            return (await pipe.infer({"x": request_input(i)}, TIMEOUT_S)).outputs

        async def delayed_fault():
            await asyncio.sleep(0.6)
            return await fault(pipe)

        stream, found = await asyncio.gather(steady_stream(infer, COUNT, RATE), delayed_fault())
        await asyncio.sleep(0.5)  # a duplicate answer, if any, would arrive now
        return stream.outcomes, pipe, found
    finally:
        await pipe.close()


def _all_correct_once(outcomes: list[Outcome], pipe: RedisPipeline) -> None:
    for o in outcomes:
        assert o.completions == 1 and o.error is None, (o.index, o.error)
        check_output(o.result, o.index)
    assert pipe.duplicate_replies == 0


def _ensure_replicas(rig: Rig) -> None:
    for stage, n in enumerate([1, 2, 1]):
        rig.chain.scale(stage, n)


def test_kill_9_of_a_middle_replica_mid_stream(rig):
    _ensure_replicas(rig)

    async def fault(pipe):
        victim = rig.chain.replica_processes(1)[1]
        held = await _freeze_holding(rig.url, victim.pid)  # so that the kill hits requests for sure
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        await asyncio.sleep(0.1)  # what it held stays pending (more may have been handed to its socket)
        affected = _indices(rig.url, held + _held_by(rig.url, victim.pid))
        assert rig.chain.replicas(1) == 1
        await asyncio.to_thread(rig.chain.scale, 1, 2)  # what an autoscaler would do
        return affected

    outcomes, pipe, affected = run(_stream(rig, fault), timeout_s=90.0)
    _all_correct_once(outcomes, pipe)
    hit = [o for o in outcomes if o.index in affected]
    print("\n" + latency_report(f"kill -9 of a middle replica (claim_idle_ms={CLAIM_IDLE_MS})", hit,
                                [o for o in outcomes if o.index not in affected]))  # fmt: skip
    assert hit and min(o.latency_s for o in hit) > 0.5 * CLAIM_IDLE_MS / 1000  # they waited for the take-over
    assert "took over request" in rig.chain.log_text(1)
    assert rig.chain.replicas(1) == 2


def test_sigstop_of_a_middle_replica_longer_than_the_claim_idle_time(rig):
    _ensure_replicas(rig)
    stop_s = 2.5 * CLAIM_IDLE_MS / 1000

    async def fault(pipe):
        victim = rig.chain.replica_processes(1)[1]
        held = await _freeze_holding(rig.url, victim.pid)
        affected = _indices(rig.url, held)
        until = time.monotonic() + stop_s
        while time.monotonic() < until:  # entries handed to its socket while frozen are hit too
            await asyncio.sleep(0.05)
            ids = _held_by(rig.url, victim.pid)
            affected |= _indices(rig.url, ids)
        os.kill(victim.pid, signal.SIGCONT)  # it finishes what it held: duplicates of taken-over work
        return affected

    outcomes, pipe, affected = run(_stream(rig, fault), timeout_s=90.0)
    _all_correct_once(outcomes, pipe)  # no second answer reached the gateway
    hit = [o for o in outcomes if o.index in affected]
    print("\n" + latency_report(f"SIGSTOP of a middle replica for {stop_s:.1f} s", hit,
                                [o for o in outcomes if o.index not in affected]))  # fmt: skip
    assert hit
    log = rig.chain.log_text(1)
    assert "took over request" in log
    assert "already handed on (duplicate)" in log  # the resumed replica's results were not written again


def _around(outcomes: list[Outcome], t0: float, t1: float) -> tuple[list[Outcome], list[Outcome]]:
    """Requests in flight (or issued) between t0 and t1, and the others."""
    hit = [o for o in outcomes if o.due <= t1 and o.ended >= t0]
    return hit, [o for o in outcomes if o not in hit]


def test_redis_restart_with_aof_loses_nothing(rig):
    _ensure_replicas(rig)

    async def fault(pipe):
        return await rig.crash_with_requests_in_flight(pipe, appendonly=True)

    outcomes, pipe, times = run(_stream(rig, fault), timeout_s=90.0)
    _all_correct_once(outcomes, pipe)
    hit, others = _around(outcomes, times["down"], times["up"])
    away = times["up"] - times["down"]
    print(
        "\n"
        + latency_report(f"Redis killed and restarted with its AOF ({away * 1000:.0f} ms away)", hit, others)
    )
    assert hit


def test_redis_restart_without_persistence_fails_the_lost_requests_clearly(rig):
    rig.restart_redis(kill=False, appendonly=False)  # from now on the server keeps nothing
    _ensure_replicas(rig)

    async def fault(pipe):
        return await rig.crash_with_requests_in_flight(pipe, appendonly=False)

    outcomes, pipe, times = run(_stream(rig, fault), timeout_s=90.0)
    failed = [o for o in outcomes if o.error is not None]
    assert failed, "no request was in flight when Redis went down"
    for o in outcomes:
        assert o.completions == 1
        if o.error is None:
            check_output(o.result, o.index)
        else:  # a clear error, soon after Redis came back: not a hang until the deadline
            assert isinstance(o.error, StageUnavailable) and "restarted without its data" in str(o.error)
            assert o.due <= times["down"] and o.ended - times["up"] < 3.0 < TIMEOUT_S
    assert all(o.error is None for o in outcomes if o.due >= times["up"])  # new requests succeed
    assert pipe.lost_requests == len(failed) and pipe.duplicate_replies == 0
    ok_hit, ok_others = _around([o for o in outcomes if o.error is None], times["down"], times["up"])
    away = times["up"] - times["down"]
    print(f"\nRedis killed and restarted empty ({away * 1000:.0f} ms away): {len(failed)} request(s) lost "
          f"and failed, the last {max(o.ended for o in failed) - times['down']:.3f} s after the crash; "
          + latency_report("requests completed across the restart", ok_hit, ok_others))  # fmt: skip
