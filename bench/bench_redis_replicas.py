"""Throughput of a Redis-transport chain with 1, 2 and 4 replicas of its bottleneck stage, in the same run.

Three stages on loopback against a private redis-server: a light first and last stage and a heavy middle
one (a chain of MatMul + Tanh), each replica one onnxruntime thread. Requests are kept ``--concurrency`` deep
through ``RedisPipeline`` for a fixed count. Baselines measured in the same run: the middle stage's own
rate in this process (one session, one thread: the rate one replica can reach at best), the stage bound
``min(replicas, cores) / middle stage time``, and the machine bound ``cores / CPU seconds per request``
(every process of the chain, Redis and the driver, measured in that row): on a 2-core machine the whole
chain shares the cores, so more replicas cannot pass the machine bound, they only take turns. Other
processes' CPU use is printed next to each row.

    python bench/bench_redis_replicas.py [--requests 300] [--concurrency 16] [--replicas 1,2,4] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from _common import LoadMeter, cores, machine_info, print_table
from onnx import TensorProto, helper, numpy_helper

from layerline.runtime.ports import free_port
from layerline.runtime.redis_launch import start_redis_chain
from layerline.runtime.redis_pipeline import RedisPipeline
from layerline.runtime.redis_server import start_redis_server
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec

WIDTH = 256


def _stage(path: Path, index: int, layers: int, rng: np.random.Generator) -> Path:
    first = "x" if index == 0 else f"h{index - 1}"
    nodes, weights, prev = [], [], first
    for j in range(layers):
        w = f"w{j}"
        weights.append(
            numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 16).astype(np.float32), w)
        )
        out = f"h{index}" if j == layers - 1 else f"t{j}"
        nodes += [
            helper.make_node("MatMul", [prev, w], [f"m{j}"]),
            helper.make_node("Tanh", [f"m{j}"], [out]),
        ]
        prev = out
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", WIDTH]) for n in (first, prev)]
    graph = helper.make_graph(nodes, f"stage{index}", [io[0]], [io[1]], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def _stage_rate(path: Path, x: np.ndarray, seconds: float = 2.0) -> float:
    """Runs per second of one session with one thread, back to back (the best one replica can do)."""
    session = open_session(path, threads=1)
    feed = {session.get_inputs()[0].name: x}
    for _ in range(5):
        session.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feed)
        n += 1
    return n / (time.perf_counter() - t0)


async def _drive(url: str, prefix: str, x: np.ndarray, requests: int, concurrency: int) -> tuple[float, int]:
    pipe = RedisPipeline(url, stages=3, prefix=prefix)
    await pipe.start()
    try:
        for _ in range(3):
            await pipe.infer({"x": x}, 30.0)
        sent, done = 0, 0

        async def worker() -> None:
            nonlocal sent, done
            while sent < requests:
                sent += 1
                await pipe.infer({"x": x}, 60.0)
                done += 1

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 600)
        return done / (time.perf_counter() - t0), pipe.duplicate_replies
    finally:
        await pipe.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--layers", type=int, default=96, help="MatMul+Tanh layers of the middle stage (96)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    counts = [int(c) for c in args.replicas.split(",")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, WIDTH)).astype(np.float32)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        work = Path(tmp)
        paths = [_stage(work / f"s{i}.onnx", i, n, rng) for i, n in enumerate((2, args.layers, 2))]
        middle_rate = _stage_rate(paths[1], x)
        server = start_redis_server(free_port(), work / "redis")
        try:
            specs = [StageSpec(i, str(p), threads=1) for i, p in enumerate(paths)]
            for k in counts:
                prefix = f"r{k}"
                chain = start_redis_chain(
                    specs, server.url, prefix=prefix, replicas=[1, k, 1], workdir=work / prefix
                )
                try:
                    pids = [p.pid for i in range(3) for p in chain.replica_processes(i)] + [server.pid]
                    with LoadMeter([*pids, os.getpid()]) as meter:
                        rate, duplicates = asyncio.run(
                            _drive(server.url, prefix, x, args.requests, args.concurrency)
                        )
                finally:
                    chain.stop()
                bound = min(k, cores()) * middle_rate
                load = meter.result
                results.append(
                    {"replicas": k, "requests_per_s": rate, "cpu_bound_rps": bound, "duplicates": duplicates,
                     "others_cores": load["others"], "ours_cores": load["ours"]}
                )  # fmt: skip
        finally:
            server.stop()
    base = results[0]["requests_per_s"]
    for r in results:
        rows.append(
            [
                f"{r['replicas']} replica(s)",
                f"{r['requests_per_s']:.1f}",
                f"{r['requests_per_s'] / base:.2f}",
                f"{r['cpu_bound_rps']:.1f}",
                f"{r['requests_per_s'] / r['cpu_bound_rps']:.2f}",
                f"{cores() * r['requests_per_s'] / max(r['ours_cores'], 1e-9):.1f}",
                f"{r['ours_cores']:.2f}",
                f"{r['others_cores']:.2f}",
            ]
        )
    print(f"machine: {machine_info()}")
    print(f"middle stage alone (1 session, 1 thread, batch {args.batch}): {middle_rate:.1f} runs/s")
    print_table(
        f"Redis chain, middle stage x N replicas ({args.requests} requests, {args.concurrency} in flight)",
        [
            "middle stage",
            "req/s",
            "vs 1 replica",
            "stage bound req/s",
            "of it",
            "machine bound",
            "our cores",
            "other cores",
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps({"middle_rate": middle_rate, "results": results}, indent=2))


if __name__ == "__main__":
    main()
