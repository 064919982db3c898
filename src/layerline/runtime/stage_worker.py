"""The loop of one stage, written only against the :class:`Inbox`/:class:`Outbox` interface.

[Note: one compute thread] The asyncio loop does all I/O; onnxruntime runs in ONE dedicated thread. While a
request computes, the loop receives the next one and sends the previous result, so consecutive stages work
on different requests at the same time (pipelining). Admitted requests wait in a bounded queue
(``queue_size``); when it is full the stage stops taking frames from its inbox, which stops reading its
sockets, and TCP pushes back on the upstream. A stage whose results are not being written (more than two
pending) stops starting new computations. Hand-offs to and from the compute thread are plain callbacks, not
tasks: on small tensors every event-loop round trip is a visible share of a hop.

[Note: inline runs] A hand-off to the compute thread and back costs about 60-80 µs here (GIL transfers,
futex and self-pipe wake-ups), more than a tiny stage's whole onnxruntime run. With ``inline_below_ms`` > 0,
a request is run on the event-loop thread when nothing else is queued and the stage's recent runs (an
exponential average) took less than that; anything slower goes back to the compute thread. Off by default.

[Note: errors travel back] A request that fails here (onnxruntime error, missing input, deadline spent,
downstream unreachable) is never dropped silently: an ERROR frame goes back upstream, relayed by every
earlier stage, to the gateway. Link changes of the downstream connection go back the same way (LINK).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from layerline.errors import ProtocolError
from layerline.runtime.framing import ErrorInfo, Frame, Kind, StageStatus, TraceEntry
from layerline.runtime.inprocess import run_stage
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.transport import ConnectionClosed, Inbox, Outbox, Received

__all__ = ["StageWorker"]

log = logging.getLogger("layerline.runtime.worker")

_MAX_PENDING_WRITES = 2


class _ComputeThread:
    """The one thread that runs onnxruntime; each result is handed to a callback in the event loop."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[..., Any], args: tuple, done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``fn(*args)`` there; then ``done(result, None)`` or ``done(None, exc)`` in the event loop."""
        self._queue.put((asyncio.get_running_loop(), fn, args, done))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fn, args, done = item
            try:
                result = fn(*args)
            except Exception as exc:  # onnxruntime raises its own exception types
                result, error = None, exc
            else:
                error = None
            try:
                loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop was closed meanwhile (shutting down)
                return

    def stop(self) -> None:
        self._queue.put(None)


@dataclass(eq=False)
class _Job:
    received: Received
    deadline: float | None
    timer: asyncio.TimerHandle | None = None
    state: str = "queued"  # queued → running, or queued → expired


class StageWorker:
    """Serves one stage (``spec`` run by ``session``) over ``inbox`` and ``outbox`` until :meth:`stop`."""

    def __init__(
        self,
        spec: StageSpec,
        session: Any,
        inbox: Inbox,
        outbox: Outbox,
        *,
        queue_size: int = 8,
        label: str = "",
        inline_below_ms: float = 0.0,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.spec = spec
        self.index = spec.index
        self.label = label or f"stage {spec.index}"
        self.queue_size = queue_size
        self.inline_below_ms = inline_below_ms
        self._typical_ms: float | None = None  # exponential average of the compute times
        self._session = session
        self._needs = list(dict.fromkeys([*(i.name for i in session.get_inputs()), *spec.forward]))
        self.inbox = inbox
        self.outbox = outbox
        self._jobs: deque[_Job] = deque()
        self._space = asyncio.Event()  # set while the queue has room
        self._space.set()
        self._running: _Job | None = None
        self._writes: deque[asyncio.Future] = deque()  # results handed to the outbox, not yet written
        self._compute = _ComputeThread(f"stage{self.index}-compute")
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._receiver: asyncio.Task | None = None
        self.served = 0
        self.failed = 0

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        """Start the inbox (listening), the outbox (connecting) and the receive loop."""
        await self.inbox.start(self._on_upstream)
        await self.outbox.start(self._on_backward, self._on_link)
        self._receiver = asyncio.create_task(self._receive_loop(), name="receive")

    async def wait(self) -> None:
        """Serve until :meth:`stop`, then close the inbox and outbox."""
        assert self._receiver is not None, "start() first"
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([self._receiver, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in [self._receiver, stop, *self._background]:
            task.cancel()
        await asyncio.gather(self._receiver, stop, *self._background, return_exceptions=True)
        await self.inbox.close()
        await self.outbox.close()
        self._compute.stop()
        if not self._receiver.cancelled() and self._receiver.exception() is not None:
            raise self._receiver.exception()  # a bug in the loop: let it surface

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
                log.info("upstream connected: %s", frame.statuses[0].detail if frame.statuses else "?")
            else:
                log.warning("ignoring a %s frame that came from upstream", frame.kind.name)

    async def _admit(self, received: Received) -> None:
        frame = received.frame
        deadline = None if frame.budget_ms is None else received.started + frame.budget_ms / 1000.0
        if deadline is not None and deadline <= time.monotonic():
            message = (
                f"stage {self.index}: the request's budget was spent before it arrived "
                f"({frame.budget_ms:.1f} ms left when sent)"
            )
            await self._fail(frame.request_id, "deadline", message)
            return
        if not self.outbox.connected:  # do not compute what cannot be sent on
            await self._fail(frame.request_id, "unavailable", self._unreachable())
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %d received (%.2f ms transfer, %s ms budget)",
                frame.request_id,
                received.transfer_s * 1000.0,
                "no" if frame.budget_ms is None else f"{frame.budget_ms:.1f}",
            )
        job = _Job(received, deadline)
        if deadline is not None:
            job.timer = asyncio.get_running_loop().call_at(deadline, self._expire, job)
        while len(self._jobs) >= self.queue_size:  # full: stop taking frames (back-pressure)
            self._space.clear()
            await self._space.wait()
        self._jobs.append(job)
        self._dispatch()

    def _expire(self, job: _Job) -> None:
        if job.state != "queued":
            return
        job.state = "expired"
        self._jobs.remove(job)  # frees its slot now (a dead request must not hold the queue)
        self._space.set()
        waited = (time.monotonic() - job.received.finished) * 1000.0
        message = (
            f"stage {self.index}: deadline passed after {waited:.1f} ms waiting in its queue "
            f"({len(self._jobs)} of {self.queue_size} slots busy)"
        )
        self._spawn(self._fail(job.received.frame.request_id, "deadline", message))

    async def _ping(self, received: Received) -> None:
        frame = received.frame
        queued = f"queue {len(self._jobs)}/{self.queue_size}"
        detail = f"{self.label}: {queued}, served {self.served}, failed {self.failed}"
        frame = dataclasses.replace(frame, statuses=(*frame.statuses, StageStatus(self.index, True, detail)))
        deadline = None if frame.budget_ms is None else received.started + frame.budget_ms / 1000.0
        if not self.outbox.connected:
            await self._return_ping(frame)
            return

        def sent(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None:
                self._spawn(self._return_ping(frame))

        self.outbox.send(frame, deadline).add_done_callback(sent)

    async def _return_ping(self, frame: Frame) -> None:
        error = ErrorInfo(self.index, "unavailable", self._unreachable())
        await self.inbox.send_back(dataclasses.replace(frame, error=error))

    async def _on_upstream(self) -> None:
        if not self.outbox.connected:
            status = StageStatus(self.index, False, self._unreachable())
            await self.inbox.send_back(Frame(Kind.LINK, 0, statuses=(status,)))

    # -- compute -------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start the next queued request if the compute thread is free and results are being written."""
        while self._running is None and self._jobs and len(self._writes) <= _MAX_PENDING_WRITES:
            job = self._jobs.popleft()
            self._space.set()
            if job.state == "expired":
                continue
            if job.timer is not None:
                job.timer.cancel()
            frame = job.received.frame
            missing = [n for n in self._needs if n not in frame.tensors]
            if missing:
                message = (
                    f"stage {self.index} needs tensor(s) {missing} that the request lacks "
                    f"(it carries {sorted(frame.tensors)})"
                )
                self._spawn(self._fail(frame.request_id, "bad_request", message))
                continue
            job.state = "running"
            self._running = job
            t0 = time.monotonic()
            args = (self._session, self.spec, dict(frame.tensors))
            if self._typical_ms is not None and self._typical_ms < self.inline_below_ms and not self._jobs:
                try:
                    outputs, error = run_stage(*args), None
                except Exception as exc:  # onnxruntime raises its own exception types
                    outputs, error = None, exc
                self._computed(job, t0, outputs, error)
            else:
                self._compute.submit(
                    run_stage,
                    args,
                    lambda outputs, error, job=job, t0=t0: self._computed(job, t0, outputs, error),
                )

    def _computed(self, job: _Job, t0: float, outputs: Any, error: BaseException | None) -> None:
        self._running = None
        t1 = time.monotonic()
        ms = (t1 - t0) * 1000.0
        self._typical_ms = ms if self._typical_ms is None else 0.8 * self._typical_ms + 0.2 * ms
        frame = job.received.frame
        if error is not None:
            self._spawn(self._fail(frame.request_id, "compute", f"stage {self.index} failed: {error}"))
        elif job.deadline is not None and t1 >= job.deadline:
            message = f"stage {self.index}: deadline passed during its compute ({(t1 - t0) * 1000:.1f} ms)"
            self._spawn(self._fail(frame.request_id, "deadline", message))
        else:
            entry = TraceEntry(
                self.index,
                recv_ms=job.received.transfer_s * 1000.0,
                queue_ms=(t0 - job.received.finished) * 1000.0,
                compute_ms=(t1 - t0) * 1000.0,
            )
            log.debug("request %d computed in %.2f ms", frame.request_id, entry.compute_ms)
            out = Frame(Kind.DATA, frame.request_id, outputs, trace=(*frame.trace, entry))
            write = self.outbox.send(out, job.deadline)
            if write.done():  # usually: the kernel took it at once
                self._written(frame.request_id, write, dispatch=False)
            else:
                self._writes.append(write)
                write.add_done_callback(lambda fut, rid=frame.request_id: self._written(rid, fut))
        self._dispatch()

    def _written(self, request_id: int, fut: asyncio.Future, dispatch: bool = True) -> None:
        while self._writes and self._writes[0].done():
            self._writes.popleft()
        error = None if fut.cancelled() else fut.exception()
        if error is None:
            self.served += 1
        elif isinstance(error, ProtocolError):  # e.g. the result exceeds max_frame_bytes
            message = f"stage {self.index} cannot send its result: {error}"
            self._spawn(self._fail(request_id, "protocol", message))
        else:
            self._spawn(self._fail(request_id, "unavailable", self._unreachable()))
        if dispatch:
            self._dispatch()

    # -- downstream side -----------------------------------------------------------------------------------

    async def _on_backward(self, received: Received) -> None:
        if received.frame.kind in (Kind.ERROR, Kind.LINK, Kind.PING):
            await self.inbox.send_back(received.frame)
        else:
            log.debug("ignoring a %s frame that came back from downstream", received.frame.kind.name)

    async def _on_link(self, up: bool, detail: str) -> None:
        status = StageStatus(self.index, up, detail if up else self._unreachable())
        await self.inbox.send_back(Frame(Kind.LINK, 0, statuses=(status,)))
