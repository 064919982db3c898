"""Per-hop cost of the Redis Streams transport vs the direct TCP chain, on loopback, in the same run.

One Identity stage; a round trip is two hops either way: gateway → worker → gateway. Direct TCP:
``DirectPipeline`` + a TCP worker. Redis: ``RedisPipeline`` + a redis-transport worker against a
private redis-server on a free loopback port, in three variants: ``redis`` (the default: frames of
``DEFAULT_BLOB_MIN_BYTES`` or more as blobs, smaller ones inline), ``inline`` (every frame inside its
stream entry) and ``blob`` (every frame in a key of its own, the entry naming it). Rounds alternate
between the variants so that load changes hit all of them. Per-hop overhead = (Redis RTT − TCP RTT) / 2.
Other processes' CPU use during the run is printed: on a shared 2-core machine it moves every number.

    python bench/bench_redis_hop.py [--iterations-scale 1.0] [--sizes 16K,64K,400K,3.2M] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import LoadMeter, machine_info, print_table
from bench_hop import identity_model

from layerline.runtime.launch import free_ports, start_local_chain
from layerline.runtime.pipeline import DirectPipeline
from layerline.runtime.redis_entries import DEFAULT_BLOB_MIN_BYTES
from layerline.runtime.redis_launch import start_redis_chain
from layerline.runtime.redis_pipeline import RedisPipeline
from layerline.runtime.redis_server import start_redis_server
from layerline.runtime.stagespec import StageSpec

SIZES = {"16K": ("16 KB", 16_000, 300), "64K": ("64 KB", 64_000, 250), "128K": ("128 KB", 128_000, 200),
         "256K": ("256 KB", 256_000, 200), "400K": ("400 KB", 400_000, 150),
         "3.2M": ("3.2 MB", 3_200_000, 40), "12.8M": ("12.8 MB", 12_800_000, 15)}  # fmt: skip
#: blob_min_bytes of each Redis variant.
VARIANTS = {"redis": DEFAULT_BLOB_MIN_BYTES, "inline": 1 << 62, "blob": 0}
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
    parser.add_argument("--sizes", default="16K,64K,400K,3.2M", help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--json", help="also write the medians (ms) here")
    args = parser.parse_args()
    sizes = [SIZES[s] for s in args.sizes.split(",")]
    directory = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    spec = StageSpec(0, identity_model(directory))
    server = start_redis_server(free_ports(1)[0], directory / "redis")
    tcp_chain = start_local_chain([spec], workdir=directory / "tcp")
    chains = {
        name: start_redis_chain(
            [spec], server.url, prefix=f"bench-{name}", workdir=directory / name, blob_min_bytes=blob_min
        )
        for name, blob_min in VARIANTS.items()
    }
    modes = ["tcp", *VARIANTS]
    results: dict[str, dict[str, list[float]]] = {label: {m: [] for m in modes} for label, _, _ in sizes}
    pids = [
        os.getpid(),
        server.pid,
        *(p.pid for c in [tcp_chain, *chains.values()] for p in c.processes if p),
    ]
    meter = LoadMeter(pids)

    async def run() -> None:
        pipes = {
            "tcp": DirectPipeline(
                "127.0.0.1", tcp_chain.ports[0], stages=1, result_port=tcp_chain.result_port
            )
        }
        for name, blob_min in VARIANTS.items():
            pipes[name] = RedisPipeline(server.url, stages=1, prefix=f"bench-{name}", blob_min_bytes=blob_min)
        for pipe in pipes.values():
            await pipe.start()
        try:
            for pipe in pipes.values():
                await _ready(pipe)
            with meter:
                for _ in range(ROUNDS):
                    for label, nbytes, iterations in sizes:
                        n = max(5, int(iterations * args.iterations_scale))
                        for mode in modes:
                            times = await _times(pipes[mode], nbytes, n)
                            results[label][mode].append(statistics.median(times))
        finally:
            for pipe in pipes.values():
                await pipe.close()

    try:
        asyncio.run(run())
    finally:
        tcp_chain.stop()
        for chain in chains.values():
            chain.stop()
        server.stop()
    rows, medians = [], {}
    for label, _, _ in sizes:
        ms = {m: statistics.median(results[label][m]) * 1000 for m in modes}
        medians[label] = ms
        t, r = ms["tcp"], ms["redis"]
        rows.append(
            [label, f"{t:.3f}", f"{r:.3f}", f"{(r - t) / 2:.3f}", f"{r / t:.2f}", f"{ms['inline']:.3f}",
             f"{ms['blob']:.3f}"]
        )  # fmt: skip
    info = machine_info()
    print(info)
    load = meter.result
    print(
        f"load during the rounds: this benchmark (gateway, workers, Redis) {load['ours']:.2f} cores, "
        f"other processes {load['others']:.2f} cores, steal {load['steal']:.2f}; "
        f"blob threshold {DEFAULT_BLOB_MIN_BYTES} B"
    )
    print_table(
        f"round trip gateway → Identity stage → gateway, medians of {ROUNDS} rounds (ms)",
        ["size", "direct TCP RTT", "Redis RTT", "Redis overhead per hop", "Redis / TCP", "inline RTT",
         "blob RTT"],
        rows,
    )  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": info, "load": load, "medians_ms": medians}, indent=2)
        )


if __name__ == "__main__":
    main()
