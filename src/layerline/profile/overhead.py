"""The measured cost of one stage hop: what an extra stage costs a request besides its compute and its link.

:func:`measure_hop_overhead` runs, in the calling process (so an agent inside a device's cgroup measures that
device), a real :class:`~layerline.runtime.stage_worker.StageWorker` with the TCP transport
(:class:`~layerline.runtime.tcp.TcpInbox` / :class:`~layerline.runtime.tcp.TcpOutbox`) serving a tiny
Identity ONNX session opened with :func:`~layerline.runtime.session.open_session`, exactly as
``layerline.runtime.worker`` serves a stage. A driver in the calling thread (blocking loopback sockets) sends
it a pre-encoded DATA frame of ``payload_bytes`` and reads the result frame from the socket the worker's
outbox connected to (like the gateway's result listener). Interleaved with it, the driver sends the same
bytes to a minimal echo thread (``recv_into`` then ``sendall``, no decoding) and reads them back.

Per hop::

    overhead = worker round trip - echo round trip - Identity run

- **included**: the worker's wake-up on the incoming bytes, reading and decoding the frame (prefix, JSON
  metadata, tensor views), admission and dispatch to the compute thread and back (``inline_below_ms=0``:
  the path of every stage whose runs take 0.2 ms or more; shorter runs stay on the event-loop thread in a
  deployment and save about 60-80 µs of it), ``run_stage``'s Python around ``session.run``, building the
  result frame with its trace entry, encoding it and ``sendmsg``;
- **excluded**: the raw socket round trip of the same bytes (the echo: two loopback crossings plus the
  kernel and wake-up work any process pays to receive and send; links are priced by the link test's
  latency and bandwidth), and the Identity ``session.run`` itself (onnxruntime's per-call cost, which every
  block measurement already contains). The driver's own send/receive is paid on both round trips and cancels.

``mean_s`` is the difference of the means over back-to-back hops: under a CPU quota it includes the
throttled waits (the sustained cost, like :attr:`LatencyStats.mean`); ``median_s`` the difference of the
medians. Both are clamped at 0. Needs only the standard library, numpy, onnxruntime and the runtime
modules (the agent's dependencies); about 0.1-0.4 s of wall time with the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import TransportError
from layerline.runtime.framing import PREFIX_SIZE, Frame, Kind, StageStatus, decode_prefix, encode
from layerline.runtime.inprocess import run_stage
from layerline.runtime.session import open_session
from layerline.runtime.stage_worker import StageWorker
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.tcp import TcpInbox, TcpOutbox

__all__ = ["HopOverhead", "identity_model_bytes", "measure_hop_overhead"]

log = logging.getLogger(__name__)

_TIMEOUT_S = 5.0
_ELEMENTS = 256  # float32: a 1 KiB tensor (the per-byte cost belongs to the link's bandwidth)


@dataclass(frozen=True)
class HopOverhead:
    """Per-hop overhead (s) and the round trips it was derived from (module docstring: what it includes)."""

    mean_s: float
    median_s: float
    worker_rtt_mean_s: float
    worker_rtt_median_s: float
    echo_rtt_mean_s: float
    echo_rtt_median_s: float
    run_mean_s: float
    run_median_s: float
    repeats: int
    warmup: int
    payload_bytes: int
    wall_s: float

    def for_planning(self, cpu_quota: float | None) -> float:
        """The value a profile stores: the mean under a CPU quota (throttling included), else the median.

        The same rule as block times (``docs/profile.md``).
        """
        return self.mean_s if cpu_quota is not None else self.median_s

    def to_json(self) -> dict[str, Any]:
        return {
            "mean_s": self.mean_s,
            "median_s": self.median_s,
            "worker_rtt_s": {"mean": self.worker_rtt_mean_s, "median": self.worker_rtt_median_s},
            "echo_rtt_s": {"mean": self.echo_rtt_mean_s, "median": self.echo_rtt_median_s},
            "run_s": {"mean": self.run_mean_s, "median": self.run_median_s},
            "repeats": self.repeats,
            "warmup": self.warmup,
            "payload_bytes": self.payload_bytes,
            "wall_s": self.wall_s,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HopOverhead:
        return cls(
            float(d["mean_s"]),
            float(d["median_s"]),
            float(d["worker_rtt_s"]["mean"]),
            float(d["worker_rtt_s"]["median"]),
            float(d["echo_rtt_s"]["mean"]),
            float(d["echo_rtt_s"]["median"]),
            float(d["run_s"]["mean"]),
            float(d["run_s"]["median"]),
            int(d["repeats"]),
            int(d["warmup"]),
            int(d["payload_bytes"]),
            float(d["wall_s"]),
        )


# -- a tiny Identity model, serialised by hand (the agent has onnxruntime but not the onnx package) --------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _float_vector(name: str) -> bytes:
    """ValueInfoProto: ``name``, a float tensor of shape ["N"]."""
    shape = _field(1, _field(2, "N"))  # TensorShapeProto.dim { dim_param: "N" }
    tensor = _field(1, 1) + _field(2, shape)  # TypeProto.Tensor { elem_type: FLOAT, shape }
    return _field(1, name) + _field(2, _field(1, tensor))


def identity_model_bytes() -> bytes:
    """A serialised ONNX model ``y = Identity(x)`` (float32, shape ["N"]; IR 8, opset 17)."""
    node = _field(1, "x") + _field(2, "y") + _field(3, "identity") + _field(4, "Identity")
    graph = (
        _field(1, node) + _field(2, "hop") + _field(11, _float_vector("x")) + _field(12, _float_vector("y"))
    )
    opset = _field(1, "") + _field(2, 17)
    return _field(1, 8) + _field(2, "layerline") + _field(7, graph) + _field(8, opset)


# -- the worker under test and the echo -------------------------------------------------------------------


class _WorkerThread:
    """A StageWorker on its own event loop in a thread, its outbox connected to ``result_port``."""

    def __init__(self, session: Any, spec: StageSpec, result_port: int, inline_below_ms: float) -> None:
        self._args = (session, spec, result_port, inline_below_ms)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: StageWorker | None = None
        self.port = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="hop-overhead-worker", daemon=True)

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(_TIMEOUT_S) or self.error is not None:
            raise TransportError(f"the measuring stage worker did not start: {self.error or 'timed out'}")
        return self.port

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the caller through start()/stop()
            self.error = exc
            self._ready.set()

    async def _serve(self) -> None:
        session, spec, result_port, inline_below_ms = self._args
        hello = Frame(Kind.HELLO, 0, statuses=(StageStatus(spec.index, True, "hop overhead"),))
        inbox = TcpInbox("127.0.0.1", 0, queue_size=2, name="hop-overhead")  # as layerline.runtime.worker
        outbox = TcpOutbox("127.0.0.1", result_port, hello=hello, name="hop-overhead downstream")
        worker = StageWorker(spec, session, inbox, outbox, inline_below_ms=inline_below_ms)
        await worker.start()
        self._loop, self._worker, self.port = asyncio.get_running_loop(), worker, inbox.port
        self._ready.set()
        await worker.wait()

    def stop(self) -> None:
        if self._loop is not None and self._worker is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._worker.stop)
        self._thread.join(_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("the hop-overhead worker thread did not stop within %.0f s", _TIMEOUT_S)
        elif self.error is not None:
            log.warning("the hop-overhead worker failed: %s", self.error)


def _echo(listener: socket.socket) -> None:
    """Accept one connection and send back every byte it receives, until it closes."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                n = conn.recv_into(buf)
                if not n:
                    return
                conn.sendall(view[:n])
            except OSError:
                return


def _read_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise TransportError("the measuring stage worker closed its connection")
        got += n


def _read_frame(sock: socket.socket, buf: bytearray) -> tuple[Kind, int]:
    """Read one whole frame into ``buf``; its kind and request id."""
    view = memoryview(buf)
    _read_exact(sock, view[:PREFIX_SIZE])
    prefix = decode_prefix(view[:PREFIX_SIZE])
    rest = prefix.meta_len + prefix.payload_len
    if PREFIX_SIZE + rest > len(buf):
        raise TransportError(f"unexpected {PREFIX_SIZE + rest}-byte frame while measuring the hop overhead")
    _read_exact(sock, view[PREFIX_SIZE : PREFIX_SIZE + rest])
    return prefix.kind, prefix.request_id


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    sock.settimeout(_TIMEOUT_S)
    return sock


def _client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _stats(samples: list[float]) -> tuple[float, float]:
    return statistics.fmean(samples), statistics.median(samples)


def measure_hop_overhead(
    repeats: int = 200, warmup: int = 20, *, inline_below_ms: float = 0.0
) -> HopOverhead:
    """Time ``repeats`` hops through a real stage worker (after ``warmup``) against a raw socket echo.

    Runs in the calling process and thread (the worker gets its own event-loop thread, like a stage
    process's loop and compute thread). Raises TransportError if the worker does not answer within 5 s.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    started = time.perf_counter()
    session = open_session(identity_model_bytes(), threads=1)
    spec = StageSpec(0, "<identity>")
    x = np.arange(_ELEMENTS, dtype=np.float32)
    frames = [b"".join(encode(Frame(Kind.DATA, rid, {"x": x}))) for rid in range(1, warmup + repeats + 1)]
    buf = bytearray(1 << 16)

    run: list[float] = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        run_stage(session, spec, {"x": x})
        if i >= warmup:
            run.append(time.perf_counter() - t0)

    results = _listener()
    echo_listener = _listener()
    echo_thread = threading.Thread(target=_echo, args=(echo_listener,), name="hop-overhead-echo", daemon=True)
    worker = _WorkerThread(session, spec, results.getsockname()[1], inline_below_ms)
    socks: list[socket.socket] = [results, echo_listener]
    try:
        worker_port = worker.start()
        downstream, _ = results.accept()  # the worker's outbox
        socks.append(downstream)
        downstream.settimeout(_TIMEOUT_S)
        kind, _ = _read_frame(downstream, buf)
        if kind is not Kind.HELLO:
            raise TransportError(f"the measuring stage worker sent {kind.name} before HELLO")
        upstream = _client(worker_port)
        socks.append(upstream)
        echo_thread.start()
        echo = _client(echo_listener.getsockname()[1])
        socks.append(echo)
        hop: list[float] = []
        raw: list[float] = []
        for i, data in enumerate(frames):
            t0 = time.perf_counter()
            upstream.sendall(data)
            kind, rid = _read_frame(downstream, buf)
            t1 = time.perf_counter()
            if kind is not Kind.DATA or rid != i + 1:
                raise TransportError(
                    f"the measuring stage worker answered {kind.name} {rid}, expected DATA {i + 1}"
                )
            echo.sendall(data)
            _read_frame(echo, buf)
            t2 = time.perf_counter()
            if i >= warmup:
                hop.append(t1 - t0)
                raw.append(t2 - t1)
    except OSError as exc:
        raise TransportError(f"measuring the hop overhead on loopback failed: {exc}") from exc
    finally:
        worker.stop()
        for sock in reversed(socks):
            sock.close()
        echo_thread.join(_TIMEOUT_S)
    hop_mean, hop_median = _stats(hop)
    raw_mean, raw_median = _stats(raw)
    run_mean, run_median = _stats(run)
    result = HopOverhead(
        mean_s=max(0.0, hop_mean - raw_mean - run_mean),
        median_s=max(0.0, hop_median - raw_median - run_median),
        worker_rtt_mean_s=hop_mean,
        worker_rtt_median_s=hop_median,
        echo_rtt_mean_s=raw_mean,
        echo_rtt_median_s=raw_median,
        run_mean_s=run_mean,
        run_median_s=run_median,
        repeats=repeats,
        warmup=warmup,
        payload_bytes=int(x.nbytes),
        wall_s=time.perf_counter() - started,
    )
    log.debug("hop overhead: %s", result)
    return result
