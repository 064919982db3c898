"""A stage worker: receives frames from upstream, runs its ONNX stage, sends the result downstream.

Run it as ``python -m layerline.runtime.worker --config worker.json``. It imports only the standard library,
numpy, onnxruntime and the runtime modules it needs (no onnx, aiohttp or prometheus): the worker image has
nothing else.

[Note: one compute thread] The asyncio loop does all I/O; onnxruntime runs in ONE dedicated thread. While a
request computes, the loop receives the next one and sends the previous result, so consecutive stages work
on different requests at the same time (pipelining). Between receiving and computing sits a bounded queue
(``queue_size``): when it is full the worker stops reading its inbox and TCP pushes back on the upstream.

[Note: errors travel back] A request that fails here (onnxruntime error, missing input, deadline spent,
downstream unreachable) is never dropped silently: an ERROR frame goes back upstream, relayed by every
earlier stage, to the gateway. Link changes of the downstream connection go back the same way (LINK).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from layerline.errors import FormatError, StageUnavailable, TransportError
from layerline.runtime.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    ErrorInfo,
    Frame,
    Kind,
    StageStatus,
    TraceEntry,
)
from layerline.runtime.inprocess import run_stage
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.tcp import TcpInbox, TcpOutbox
from layerline.runtime.transport import ConnectionClosed, Inbox, Outbox, Received

__all__ = ["StageWorker", "WorkerConfig", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one stage worker needs; ``downstream`` is the next stage or the result listener."""

    stage: StageSpec
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    downstream_host: str = "127.0.0.1"
    downstream_port: int = 0
    queue_size: int = 8
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    name: str = ""

    format_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        for what, port in (("listen_port", self.listen_port), ("downstream_port", self.downstream_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{what} must be in 0..65535, got {port}")
        if self.max_frame_bytes < 1024:
            raise ValueError(f"max_frame_bytes must be >= 1024, got {self.max_frame_bytes}")

    @property
    def label(self) -> str:
        return self.name or f"stage {self.stage.index}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "stage": self.stage.to_json(),
            "listen": {"host": self.listen_host, "port": self.listen_port},
            "downstream": {"host": self.downstream_host, "port": self.downstream_port},
            "queue_size": self.queue_size,
            "max_frame_bytes": self.max_frame_bytes,
            "name": self.name,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerConfig:
        version = data.get("format_version")
        if version != cls.format_version:
            raise FormatError(
                f"worker config format_version is {version!r}, this layerline reads {cls.format_version}; "
                "regenerate the worker config with this version"
            )
        try:
            return cls(
                stage=StageSpec.from_json(data["stage"]),
                listen_host=str(data["listen"]["host"]),
                listen_port=int(data["listen"]["port"]),
                downstream_host=str(data["downstream"]["host"]),
                downstream_port=int(data["downstream"]["port"]),
                queue_size=int(data.get("queue_size", 8)),
                max_frame_bytes=int(data.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)),
                name=str(data.get("name", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"worker config is malformed ({exc!r}); regenerate it") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> WorkerConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FormatError(f"cannot read worker config {path}: {exc}") from exc
        return cls.from_json(data)


@dataclass(eq=False)
class _Job:
    received: Received
    deadline: float | None
    timer: asyncio.TimerHandle | None = None
    state: str = "queued"  # queued → running, or queued → expired


class StageWorker:
    """Serves one stage over an :class:`Inbox` and an :class:`Outbox` until :meth:`stop`."""

    def __init__(self, config: WorkerConfig, session: Any, inbox: Inbox, outbox: Outbox) -> None:
        self.config = config
        self.index = config.stage.index
        self._session = session
        self._needs = list(dict.fromkeys([*(i.name for i in session.get_inputs()), *config.stage.forward]))
        self.inbox = inbox
        self.outbox = outbox
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(config.queue_size)
        self._send_q: asyncio.Queue[tuple[Frame, float | None]] = asyncio.Queue(2)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.index}-compute")
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self.served = 0
        self.failed = 0

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        """Start the inbox (listening), the outbox (connecting) and the worker loops."""
        await self.inbox.start(self._on_upstream)
        await self.outbox.start(self._on_backward, self._on_link)
        self._loops = [
            asyncio.create_task(self._receive_loop(), name="receive"),
            asyncio.create_task(self._compute_loop(), name="compute"),
            asyncio.create_task(self._send_loop(), name="send"),
        ]

    async def wait(self) -> None:
        """Serve until :meth:`stop`, then close the inbox and outbox."""
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([*self._loops, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in [*self._loops, stop, *self._background]:
            task.cancel()
        await asyncio.gather(*self._loops, stop, *self._background, return_exceptions=True)
        await self.inbox.close()
        await self.outbox.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for task in done:
            if task is not stop and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # a bug in a loop: let it surface

    async def run(self) -> None:
        """:meth:`start`, then :meth:`wait`."""
        await self.start()
        await self.wait()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fail(self, request_id: int, code: str, message: str) -> None:
        self.failed += 1
        log.debug("request %d failed (%s): %s", request_id, code, message)
        await self.inbox.send_back(Frame(Kind.ERROR, request_id, error=ErrorInfo(self.index, code, message)))

    def _unreachable(self) -> str:
        return f"stage {self.index} cannot reach its downstream {self.outbox.peer} ({self.outbox.last_error})"

    # -- upstream side -------------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            try:
                received = await self.inbox.receive()
            except ConnectionClosed:
                return
            frame = received.frame
            if frame.kind is Kind.DATA:
                await self._admit(received)
            elif frame.kind is Kind.PING:
                await self._ping(received)
            elif frame.kind is Kind.HELLO:
                who = frame.statuses[0].detail if frame.statuses else "?"
                log.info("upstream connected: %s", who)
            else:
                log.warning("ignoring a %s frame that came from upstream", frame.kind.name)

    async def _admit(self, received: Received) -> None:
        frame = received.frame
        deadline = None if frame.budget_ms is None else received.started + frame.budget_ms / 1000.0
        if deadline is not None and deadline <= time.monotonic():
            await self._fail(
                frame.request_id,
                "deadline",
                f"stage {self.index}: the request's budget was spent before it arrived "
                f"({frame.budget_ms:.1f} ms left when sent)",
            )
            return
        if not self.outbox.connected:  # do not compute what cannot be sent on
            await self._fail(frame.request_id, "unavailable", self._unreachable())
            return
        job = _Job(received, deadline)
        if deadline is not None:
            job.timer = asyncio.get_running_loop().call_at(deadline, self._expire, job)
        await self._queue.put(job)  # blocks when full: back-pressure

    def _expire(self, job: _Job) -> None:
        if job.state != "queued":
            return
        job.state = "expired"
        waited = (time.monotonic() - job.received.finished) * 1000.0
        message = (
            f"stage {self.index}: deadline passed after {waited:.1f} ms waiting in its queue "
            f"({self._queue.qsize()} of {self.config.queue_size} slots busy)"
        )
        self._spawn(self._fail(job.received.frame.request_id, "deadline", message))

    async def _ping(self, received: Received) -> None:
        frame = received.frame
        detail = (
            f"{self.config.label}: queue {self._queue.qsize()}/{self.config.queue_size}, "
            f"served {self.served}, failed {self.failed}"
        )
        frame = dataclasses.replace(frame, statuses=(*frame.statuses, StageStatus(self.index, True, detail)))
        deadline = None if frame.budget_ms is None else received.started + frame.budget_ms / 1000.0
        if self.outbox.connected:
            try:
                await self.outbox.send(frame, deadline)
                return
            except (StageUnavailable, TransportError):
                pass
        error = ErrorInfo(self.index, "unavailable", self._unreachable())
        await self.inbox.send_back(dataclasses.replace(frame, error=error))

    async def _on_upstream(self) -> None:
        if not self.outbox.connected:
            status = StageStatus(self.index, False, self._unreachable())
            await self.inbox.send_back(Frame(Kind.LINK, 0, statuses=(status,)))

    # -- compute -------------------------------------------------------------------------------------------

    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if job.state == "expired":
                continue
            if job.timer is not None:
                job.timer.cancel()
            job.state = "running"
            frame = job.received.frame
            missing = [n for n in self._needs if n not in frame.tensors]
            if missing:
                await self._fail(
                    frame.request_id,
                    "bad_request",
                    f"stage {self.index} needs tensor(s) {missing} that the request lacks "
                    f"(it carries {sorted(frame.tensors)})",
                )
                continue
            t0 = time.monotonic()
            try:
                outputs = await loop.run_in_executor(
                    self._executor, run_stage, self._session, self.config.stage, dict(frame.tensors)
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                await self._fail(frame.request_id, "compute", f"stage {self.index} failed: {exc}")
                continue
            t1 = time.monotonic()
            if job.deadline is not None and t1 >= job.deadline:
                await self._fail(
                    frame.request_id,
                    "deadline",
                    f"stage {self.index}: deadline passed during its compute ({(t1 - t0) * 1000:.1f} ms)",
                )
                continue
            entry = TraceEntry(
                self.index,
                recv_ms=job.received.transfer_s * 1000.0,
                queue_ms=(t0 - job.received.finished) * 1000.0,
                compute_ms=(t1 - t0) * 1000.0,
            )
            log.debug("request %d computed in %.2f ms", frame.request_id, entry.compute_ms)
            out = Frame(Kind.DATA, frame.request_id, outputs, trace=(*frame.trace, entry))
            await self._send_q.put((out, job.deadline))

    # -- downstream side -----------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            frame, deadline = await self._send_q.get()
            try:
                await self.outbox.send(frame, deadline)
                self.served += 1
            except (StageUnavailable, TransportError):
                await self._fail(frame.request_id, "unavailable", self._unreachable())

    async def _on_backward(self, received: Received) -> None:
        if received.frame.kind in (Kind.ERROR, Kind.LINK, Kind.PING):
            await self.inbox.send_back(received.frame)
        else:
            log.debug("ignoring a %s frame that came back from downstream", received.frame.kind.name)

    async def _on_link(self, up: bool, detail: str) -> None:
        status = StageStatus(self.index, up, detail if up else self._unreachable())
        await self.inbox.send_back(Frame(Kind.LINK, 0, statuses=(status,)))


def _describe(args: Any) -> str:
    return ", ".join(f"{a.name}[{a.type} {a.shape}]" for a in args)


async def serve(config: WorkerConfig, session: Any, ready_file: str | None = None) -> None:
    """Serve ``config`` over TCP until SIGTERM/SIGINT; writes ``ready_file`` once listening."""
    hello = Frame(Kind.HELLO, 0, statuses=(StageStatus(config.stage.index, True, config.label),))
    inbox = TcpInbox(
        config.listen_host, config.listen_port, max_frame_bytes=config.max_frame_bytes, name=config.label
    )
    outbox = TcpOutbox(
        config.downstream_host,
        config.downstream_port,
        max_frame_bytes=config.max_frame_bytes,
        hello=hello,
        name=f"{config.label} downstream",
    )
    worker = StageWorker(config, session, inbox, outbox)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.start()
    log.info(
        "stage %d listening on %s:%d; model %s; inputs %s; outputs %s; forward %s; downstream %s",
        config.stage.index,
        config.listen_host,
        inbox.port,
        config.stage.model_path,
        _describe(session.get_inputs()),
        _describe(session.get_outputs()),
        list(config.stage.forward),
        outbox.peer,
    )
    if ready_file:
        tmp = f"{ready_file}.tmp"
        info = {
            "stage": config.stage.index,
            "host": config.listen_host,
            "port": inbox.port,
            "pid": os.getpid(),
        }
        Path(tmp).write_text(json.dumps(info))
        os.replace(tmp, ready_file)
    await worker.wait()
    log.info("stage %d stopped (served %d, failed %d)", config.stage.index, worker.served, worker.failed)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _parse(argv: list[str] | None) -> tuple[WorkerConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m layerline.runtime.worker", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", help="worker config JSON (WorkerConfig.to_json)")
    p.add_argument("--model", help="stage ONNX file (instead of --config)")
    p.add_argument("--stage", type=int, default=0, help="stage index")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on for upstream")
    p.add_argument("--downstream", default=None, help="HOST:PORT of the next stage or result listener")
    p.add_argument("--forward", default="", help="comma-separated tensor names passed on unchanged")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exact", action="store_true")
    p.add_argument("--queue-size", type=int, default=8)
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
    p.add_argument("--name", default="")
    p.add_argument("--ready-file", help="write {stage, host, port, pid} JSON here once listening")
    p.add_argument("--log-level", default=os.environ.get("LAYERLINE_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if args.config:
        return WorkerConfig.load(args.config), args
    if not args.model or not args.downstream:
        p.error("give --config, or --model and --downstream")
    listen_host, listen_port = _host_port(args.listen)
    down_host, down_port = _host_port(args.downstream)
    forward = tuple(n for n in args.forward.split(",") if n)
    spec = StageSpec(args.stage, args.model, forward, args.threads, args.exact)
    config = WorkerConfig(
        spec, listen_host, listen_port, down_host, down_port, args.queue_size, args.max_frame_bytes, args.name
    )
    return config, args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m layerline.runtime.worker``; returns the exit code."""
    try:
        config, args = _parse(argv)
    except (FormatError, ValueError) as exc:
        print(f"layerline worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{config.label}] %(message)s",
        stream=sys.stderr,
    )
    spec = config.stage
    try:
        session = open_session(spec.model_path, spec.threads, spec.exact)
    except Exception as exc:  # onnxruntime raises its own exception types
        print(
            f"layerline worker: {config.label}: cannot load model {spec.model_path}: {exc}", file=sys.stderr
        )
        return 1
    try:
        asyncio.run(serve(config, session, args.ready_file))
    except OSError as exc:  # e.g. the port is taken
        print(f"layerline worker: {config.label}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
