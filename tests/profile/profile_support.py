"""Tiny sliced models and an artificial link (a delaying, rate-capped TCP relay) for the profile tests."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerline.graph import slice_model


def matmul_chain(layers: int = 3, width: int = 64, reps: int = 1, seed: int = 0) -> onnx.ModelProto:
    """``layers`` layers, each ``reps`` MatMul(width×width)+Relu, dynamic batch."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        for r in range(reps):
            w = f"w{i}_{r}"
            inits.append(
                numpy_helper.from_array((rng.standard_normal((width, width)) * 0.05).astype(np.float32), w)
            )
            nodes.append(helper.make_node("MatMul", [x, w], [f"m{i}_{r}"]))
            nodes.append(helper.make_node("Relu", [f"m{i}_{r}"], [f"r{i}_{r}"]))
            x = f"r{i}_{r}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def sliced_chain(path: Path, max_blocks: int | None = None, **kwargs) -> Path:
    slice_model(matmul_chain(**kwargs), path, name="chain", max_blocks=max_blocks)
    return path


class DelayRelay:
    """A TCP relay to ``target`` that delivers every chunk ``delay_s`` after it arrived, at most
    ``rate_Bps`` bytes per second per direction: an artificial link of known latency and bandwidth."""

    def __init__(self, target: tuple[str, int], delay_s: float, rate_Bps: float | None = None) -> None:
        self.target, self.delay_s, self.rate_Bps = target, delay_s, rate_Bps
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            self.socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                q: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(src, q), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, q), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.Queue) -> None:
        while True:
            try:
                data = src.recv(16384)
            except OSError:
                data = b""
            q.put((time.perf_counter(), data))
            if not data:
                return

    def _write(self, dst: socket.socket, q: queue.Queue) -> None:
        link_free = 0.0
        while True:
            arrived, data = q.get()
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            ready = max(arrived + self.delay_s, link_free)
            if self.rate_Bps:
                ready += len(data) / self.rate_Bps
            link_free = ready
            pause = ready - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
