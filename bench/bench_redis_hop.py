"""Per-hop cost of the Redis Streams transport vs the direct TCP chain, on loopback, in the same run.

One Identity stage; a round trip is two hops either way: gateway → worker → gateway. Direct TCP:
``DirectPipeline`` + a TCP worker. Redis: ``RedisPipeline`` (XADD to the stage's stream, XREAD of its
reply stream) + a redis-transport worker (XREADGROUP, then one Lua script: SET NX + XADD + XACK + XDEL),
against a private redis-server on a free loopback port. Rounds alternate between the two so that load
changes hit both. Per-hop overhead = (redis RTT − TCP RTT) / 2.

    python bench/bench_redis_hop.py [--iterations-scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_info, print_table
from bench_hop import identity_model

from layerline.runtime.launch import free_ports, start_local_chain
from layerline.runtime.pipeline import DirectPipeline
from layerline.runtime.redis_launch import start_redis_chain
from layerline.runtime.redis_pipeline import RedisPipeline
from layerline.runtime.redis_server import start_redis_server
from layerline.runtime.stagespec import StageSpec

SIZES = [("16 KB", 16_000, 300), ("400 KB", 400_000, 150), ("3.2 MB", 3_200_000, 40)]
ROUNDS = 3


async def _times(pipe, nbytes: int, iterations: int, warmup: int = 10) -> list[float]:
    x = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    times = []
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        result = await pipe.infer({"x": x}, 30.0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    assert np.array_equal(result.outputs["y"], x)
    return times


async def _ready(pipe, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (await pipe.health(1.0)).ready:
        if time.monotonic() > deadline:
            raise RuntimeError("the stage did not become ready")
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations-scale", type=float, default=1.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    spec = StageSpec(0, identity_model(directory))
    server = start_redis_server(free_ports(1)[0], directory / "redis")
    tcp_chain = start_local_chain([spec], workdir=directory / "tcp")
    redis_chain = start_redis_chain([spec], server.url, prefix="bench", workdir=directory / "rc")
    results: dict[str, dict[str, list[float]]] = {label: {"tcp": [], "redis": []} for label, _, _ in SIZES}

    async def run() -> None:
        tcp = DirectPipeline("127.0.0.1", tcp_chain.ports[0], stages=1, result_port=tcp_chain.result_port)
        rds = RedisPipeline(server.url, stages=1, prefix="bench")
        await tcp.start()
        await rds.start()
        try:
            await _ready(tcp)
            await _ready(rds)
            for _ in range(ROUNDS):
                for label, nbytes, iterations in SIZES:
                    n = max(5, int(iterations * args.iterations_scale))
                    results[label]["tcp"].append(statistics.median(await _times(tcp, nbytes, n)))
                    results[label]["redis"].append(statistics.median(await _times(rds, nbytes, n)))
        finally:
            await tcp.close()
            await rds.close()

    try:
        asyncio.run(run())
    finally:
        tcp_chain.stop()
        redis_chain.stop()
        server.stop()
    rows = []
    for label, _, _ in SIZES:
        t = statistics.median(results[label]["tcp"]) * 1000
        r = statistics.median(results[label]["redis"]) * 1000
        rows.append([label, f"{t:.3f}", f"{r:.3f}", f"{(r - t) / 2:.3f}", f"{r / t:.2f}"])
    print(machine_info())
    print_table(
        f"round trip gateway → Identity stage → gateway, medians of {ROUNDS} rounds (ms)",
        ["size", "direct TCP RTT", "Redis RTT", "Redis overhead per hop", "ratio Redis / TCP"],
        rows,
    )


if __name__ == "__main__":
    main()
