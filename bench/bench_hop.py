"""Per-hop cost of the stage runtime on loopback: one real worker (Identity model) vs a plain TCP echo.

Both sides move the same bytes over two hops per round trip: the gateway sends a tensor to the worker, the
worker runs its Identity model and sends the result to the gateway's result listener; the echo client
sends the same bytes to an echo process (blocking sockets, preallocated buffers) and reads them back.
Target: worker round trip <= 1.5 x echo round trip + 0.3 ms. Measured twice: with onnxruntime in the
worker's compute thread (the default) and with ``inline_below_ms=0.2`` (runs this small stay on the
event-loop thread, saving the thread hand-off). The last column is the CPU (in cores) that
other processes used meanwhile: on a shared machine it makes every number slower, the Python side most.

    python bench/bench_hop.py [--iterations-scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from _common import LoadMeter, machine_info, print_table
from onnx import TensorProto, helper

from layerline.runtime.launch import free_ports, start_local_chain
from layerline.runtime.pipeline import DirectPipeline
from layerline.runtime.stagespec import StageSpec

SIZES = [("16 KB", 16_000, 400), ("400 KB", 400_000, 200), ("12.8 MB", 12_800_000, 40)]
ROUNDS = 4

ECHO_SERVER = r"""
import socket, struct, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1)
print("ready", flush=True)
buf = bytearray(64 << 20); view = memoryview(buf); head = bytearray(8)
def fill(conn, v):
    got = 0
    while got < len(v):
        n = conn.recv_into(v[got:])
        if not n: return False
        got += n
    return True
while True:
    conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while fill(conn, memoryview(head)):
        (n,) = struct.unpack("<Q", head)
        fill(conn, view[:n]); conn.sendall(view[:n])
    conn.close()
"""


def identity_model(directory: Path) -> str:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = directory / "identity.onnx"
    onnx.save(model, path)
    return str(path)


def echo_times(nbytes: int, iterations: int, warmup: int, port: int) -> list[float]:
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    back = bytearray(nbytes)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    try:
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            sock.sendmsg([struct.pack("<Q", nbytes), memoryview(data)])
            view, got = memoryview(back), 0
            while got < nbytes:
                got += sock.recv_into(view[got:])
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        sock.close()
    assert bytes(back[:64]) == data[:64].tobytes()
    return times


async def worker_times(pipe: DirectPipeline, nbytes: int, iterations: int, warmup: int):
    x = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    times, compute = [], []
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        result = await pipe.infer({"x": x}, 30.0)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
            compute.append(result.stages[0].compute_s)
    assert np.array_equal(result.outputs["y"], x)
    return times, compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations-scale", type=float, default=1.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-hop-"))
    (echo_port,) = free_ports(1)
    echo = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(echo_port)], stdout=subprocess.PIPE, text=True
    )
    echo.stdout.readline()
    model = identity_model(directory)
    rows = []

    async def measure(mode: str, inline_below_ms: float) -> None:
        chain = start_local_chain(
            [StageSpec(0, model)],
            workdir=directory / mode,
            inline_below_ms=inline_below_ms,
            log_level="WARNING",
        )
        pipe = DirectPipeline("127.0.0.1", chain.ports[0], stages=1, result_port=chain.result_port)
        try:
            await pipe.start()
            assert (await pipe.wait_ready(10.0)).ready
            for label, nbytes, iterations in SIZES:
                n = max(8, int(iterations * args.iterations_scale))
                etimes, wtimes, compute = [], [], []
                with LoadMeter([os.getpid(), echo.pid, *(p.pid for p in chain.processes if p)]) as load:
                    for _ in range(ROUNDS):  # alternate, so that both see the same background load
                        etimes += echo_times(nbytes, n // ROUNDS, max(2, n // 20), echo_port)
                        w, c = await worker_times(pipe, nbytes, n // ROUNDS, max(2, n // 20))
                        wtimes += w
                        compute += c
                rows.append((label, mode, len(etimes), etimes, wtimes, compute, load.result["others"]))
        finally:
            await pipe.close()
            chain.stop()

    async def measure_all() -> None:
        await measure("thread", 0.0)  # the default: onnxruntime always in the compute thread
        await measure("inline", 0.2)  # inline_below_ms=0.2: tiny runs stay on the event-loop thread

    try:
        asyncio.run(measure_all())
        info = machine_info()
        print(f"{info['cpu_model']}, {info['cores']} cores, Python {info['python']}, {info['date_utc']}")
        table = []
        for label, mode, n, etimes, wtimes, compute, others in rows:
            e, w, c = statistics.median(etimes), statistics.median(wtimes), statistics.median(compute)
            target = 1.5 * e + 0.0003
            table.append(
                [
                    label,
                    mode,
                    n,
                    f"{e * 1e3:.3f}",
                    f"{w * 1e3:.3f}",
                    f"{w / e:.2f}",
                    f"{e * 500:.3f}",
                    f"{w * 500:.3f}",
                    f"{c * 1e3:.3f}",
                    f"{target * 1e3:.3f}",
                    "yes" if w <= target else "NO",
                    f"{others:.2f}",
                ]
            )
        print_table(
            "round trip over loopback (2 hops), medians in ms; target: worker <= 1.5 x echo + 0.3 ms",
            [
                "size",
                "compute in",
                "n",
                "echo RTT",
                "worker RTT",
                "ratio",
                "echo/hop",
                "worker/hop",
                "compute",
                "target",
                "ok",
                "other load (cores)",
            ],
            table,
        )
    finally:
        echo.kill()
        echo.wait()


if __name__ == "__main__":
    main()
