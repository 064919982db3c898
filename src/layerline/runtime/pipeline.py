"""The gateway side of the direct TCP chain: a :class:`~layerline.runtime.api.Pipeline` over stage workers.

``gateway → stage 0 → … → stage N-1 → gateway's result listener``. The gateway keeps one persistent
connection to stage 0 (reconnecting with backoff) on which it sends requests and receives what comes back
upstream (ERROR, LINK, returned PING frames), and it listens for results from the last stage.

[Note: failing fast] A request never waits for its deadline when the chain is known to be broken: with no
connection to stage 0 ``infer`` raises ``StageUnavailable`` at once; a stage that cannot reach its
downstream answers each new request with an ERROR frame at once. Requests already in flight when a stage
reports a lost downstream link get ``lost_grace_s`` to come back (those past the broken link may still
complete), then fail with ``StageUnavailable`` naming the stage; the deadline bounds everything.

[Note: deadline margin] Stages get a budget slightly smaller than the caller's timeout (see
``_budget_margin``), so that a stage that gives up (naming itself) is heard before the gateway's own timer
fires with a less precise message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from layerline.errors import (
    BadRequest,
    DeadlineExceeded,
    InferenceError,
    ProtocolError,
    StageFailed,
    StageUnavailable,
)
from layerline.runtime.api import InferResult, PipelineHealth, StageHealth, StageTiming
from layerline.runtime.framing import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_FRAME_BYTES,
    ErrorInfo,
    Frame,
    Kind,
    StageStatus,
    wire_dtype,
)
from layerline.runtime.tcp import TcpInbox, TcpOutbox
from layerline.runtime.transport import Received

__all__ = ["DirectPipeline"]

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[InferenceError]] = {
    "compute": StageFailed,
    "protocol": StageFailed,
    "bad_request": BadRequest,
    "unavailable": StageUnavailable,
    "deadline": DeadlineExceeded,
}


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future
    write: asyncio.Future | None = None  # the request frame's write to stage 0
    note: str = ""  # what is known about why it may not come back


def _budget_margin(timeout_s: float) -> float:
    """How much earlier than the gateway the stages give up, so that their ERROR (naming the stage) wins.

    10 % of the timeout, at least 20 ms (one more hop under load) but at most a quarter of it, and 100 ms.
    """
    return min(0.1, max(0.02, 0.1 * timeout_s), 0.25 * timeout_s)


class DirectPipeline:
    """Sends requests to stage ``host:port`` and collects results on ``result_host:result_port``.

    ``stages``: how many stages the chain has (for health reports). ``max_in_flight``: requests sent and
    not yet answered; more callers queue (their wait counts against their deadline). ``budget_margin_s``:
    how much less than ``timeout_s`` the stages get (default: see ``_budget_margin``); raise it on slow or
    congested links so that a stage's deadline ERROR, which names the stage, beats the gateway's timer.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        stages: int,
        result_host: str = "127.0.0.1",
        result_port: int = 0,
        max_in_flight: int = 64,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        lost_grace_s: float = 1.0,
        backoff_s: tuple[float, float] = (0.05, 1.0),
        budget_margin_s: float | None = None,
    ) -> None:
        if stages < 1:
            raise ValueError(f"a pipeline needs at least one stage, got stages={stages}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.stages = stages
        self.max_in_flight = max_in_flight
        self.lost_grace_s = lost_grace_s
        self.budget_margin_s = budget_margin_s
        self._outbox = TcpOutbox(
            host,
            port,
            max_frame_bytes=max_frame_bytes,
            hello=Frame(Kind.HELLO, 0, statuses=(StageStatus(-1, True, "gateway"),)),
            backoff_s=backoff_s,
            name="gateway → stage 0",
        )
        self._results = TcpInbox(
            result_host,
            result_port,
            max_frame_bytes=max_frame_bytes,
            name="gateway results",
            handler=self._on_result,
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._pings: dict[int, asyncio.Future] = {}
        self._broken: dict[int, str] = {}  # stage k → why stage k cannot reach its downstream
        self._slots = asyncio.Semaphore(max_in_flight)
        self._state = "new"

    @property
    def result_port(self) -> int:
        """The port the result listener is bound to (the real one after :meth:`start` with port 0)."""
        return self._results.port

    @property
    def connected(self) -> bool:
        """Whether the connection to stage 0 is up."""
        return self._outbox.connected

    async def start(self) -> None:
        """Listen for results and start connecting to stage 0 (returns without waiting for it)."""
        if self._state != "new":
            raise RuntimeError(f"DirectPipeline.start() called on a pipeline that is {self._state}")
        await self._results.start()
        await self._outbox.start(self._on_backward, self._on_link)
        self._state = "started"

    async def wait_ready(self, timeout_s: float, probe_timeout_s: float = 1.0) -> PipelineHealth:
        """Probe :meth:`health` until every stage answers or ``timeout_s`` passes; the last report."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            report = await self.health(max(0.01, min(probe_timeout_s, left)))
            if report.ready or time.monotonic() >= deadline:
                return report
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _check_started(self) -> None:
        if self._state != "started":
            raise RuntimeError(f"DirectPipeline is {self._state}; call start() first (and not after close())")

    def _stage_name(self, k: int) -> str:
        return "the gateway's result listener" if k >= self.stages else f"stage {k}"

    def _not_connected(self) -> str:
        return f"stage 0 at {self._outbox.peer} is not connected: {self._outbox.last_error}"

    # -- requests -------------------------------------------------------------------------------------------

    @staticmethod
    def _wire_inputs(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {}
        for name, value in inputs.items():
            arr = np.asarray(value)
            if wire_dtype(arr.dtype) is None:
                raise BadRequest(
                    f"input {name!r} has dtype {arr.dtype.name!r}; send one of {sorted(ALLOWED_DTYPES)}"
                )
            tensors[name] = arr
        return tensors

    async def infer(self, inputs: Mapping[str, np.ndarray], timeout_s: float) -> InferResult:
        """Run one request through the chain (see :class:`~layerline.runtime.api.Pipeline`)."""
        self._check_started()
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        tensors = self._wire_inputs(inputs)
        if not self._outbox.connected:
            raise StageUnavailable(self._not_connected())
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"request waited {timeout_s:.3f} s at the gateway behind {self.max_in_flight} requests "
                    "in flight; raise max_in_flight or the timeout, or add capacity"
                ) from None
        else:
            await self._slots.acquire()  # a free slot: does not suspend
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        entry = _Pending(loop.create_future())
        self._pending[rid] = entry
        timer = loop.call_at(deadline, self._expire, rid, entry, timeout_s)
        try:
            margin = _budget_margin(timeout_s) if self.budget_margin_s is None else self.budget_margin_s
            entry.write = self._outbox.send(Frame(Kind.DATA, rid, tensors), deadline - margin)
            if not entry.write.done() or entry.write.exception() is not None:  # usually written at once
                entry.write.add_done_callback(lambda write: self._written(entry, write))
            received = await entry.future
        finally:
            timer.cancel()
            self._pending.pop(rid, None)
            self._slots.release()
        return self._result(received, t0)

    def _written(self, entry: _Pending, write: asyncio.Future) -> None:
        error = None if write.cancelled() else write.exception()
        if error is None or entry.future.done():
            return
        if isinstance(error, ProtocolError):  # e.g. over max_frame_bytes
            entry.future.set_exception(BadRequest(str(error)))
        else:
            entry.future.set_exception(StageUnavailable(self._not_connected()))

    def _expire(self, rid: int, entry: _Pending, timeout_s: float) -> None:
        if entry.future.done():
            return
        if entry.write is not None and not entry.write.done():
            message = (
                f"request {rid} could not even be sent to stage 0 within {timeout_s:.3f} s: the chain is "
                "not reading (back-pressure from a slow or stalled stage)"
            )
        else:
            where = entry.note or self._known_breaks() or "no stage reported a problem"
            message = f"request {rid} got no result within {timeout_s:.3f} s ({where})"
        entry.future.set_exception(DeadlineExceeded(message))

    def _result(self, received: Received, t0: float) -> InferResult:
        trace = received.frame.trace
        timings = []
        for i, entry in enumerate(trace):
            send_ms = trace[i + 1].recv_ms if i + 1 < len(trace) else received.transfer_s * 1000.0
            timings.append(
                StageTiming(entry.stage, entry.queue_ms / 1000.0, entry.compute_ms / 1000.0, send_ms / 1000.0)
            )
        return InferResult(dict(received.frame.tensors), tuple(timings), time.monotonic() - t0)

    def _known_breaks(self) -> str:
        return "; ".join(
            f"{self._stage_name(k + 1)} is unreachable: {why}" for k, why in sorted(self._broken.items())
        )

    # -- frames coming back ---------------------------------------------------------------------------------

    def _on_result(self, received: Received) -> None:
        frame = received.frame
        if frame.kind is Kind.DATA:
            entry = self._pending.get(frame.request_id)
            if entry is not None and not entry.future.done():
                entry.future.set_result(received)
            else:
                log.debug("discarding the late result of request %d", frame.request_id)
        elif frame.kind is Kind.PING:
            self._resolve_ping(received)
        elif frame.kind is Kind.HELLO:
            log.info("result link up from %s", frame.statuses[0].detail if frame.statuses else "?")
        else:
            log.warning("ignoring a %s frame on the result listener", frame.kind.name)

    def _resolve_ping(self, received: Received) -> None:
        fut = self._pings.get(received.frame.request_id)
        if fut is not None and not fut.done():
            fut.set_result(received)

    async def _on_backward(self, received: Received) -> None:
        frame = received.frame
        if frame.kind is Kind.ERROR:
            entry = self._pending.get(frame.request_id)
            error = frame.error or ErrorInfo(-1, "protocol", "an ERROR frame without error details")
            if entry is not None and not entry.future.done():
                entry.future.set_exception(_ERRORS[error.code](error.message))
            elif frame.request_id in self._pings:
                self._resolve_ping(received)
            elif frame.request_id == 0:
                log.warning("stage 0 rejected the connection: %s", error.message)
            else:
                log.debug("discarding an error for finished request %d: %s", frame.request_id, error.message)
        elif frame.kind is Kind.PING:
            self._resolve_ping(received)
        elif frame.kind is Kind.LINK and frame.statuses:
            status = frame.statuses[0]
            if status.ready:
                self._broken.pop(status.stage, None)
            else:
                self._broken[status.stage] = status.detail
                self._lost(f"{self._stage_name(status.stage + 1)} became unreachable: {status.detail}")

    async def _on_link(self, up: bool, detail: str) -> None:
        self._broken.clear()  # stages re-report their state on a new connection
        if not up:
            self._lost(f"the connection to stage 0 broke ({detail})")

    def _lost(self, why: str) -> None:
        """Requests in flight now may be lost: give them ``lost_grace_s``, then fail them."""
        loop = asyncio.get_running_loop()
        for entry in self._pending.values():
            if entry.future.done():
                continue
            entry.note = why
            loop.call_later(self.lost_grace_s, self._give_up, entry, why)

    def _give_up(self, entry: _Pending, why: str) -> None:
        if not entry.future.done():
            entry.future.set_exception(
                StageUnavailable(
                    f"{why}; the request did not come back within {self.lost_grace_s} s after that"
                )
            )

    # -- health -------------------------------------------------------------------------------------------

    async def health(self, timeout_s: float) -> PipelineHealth:
        """Send a PING through the chain; ready when every stage appended a ready status in time."""
        self._check_started()
        if not self._outbox.connected:
            why = self._not_connected()
            stages = tuple(
                StageHealth(i, False, why if i == 0 else "not reached") for i in range(self.stages)
            )
            return PipelineHealth(False, stages, why)
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pings[rid] = fut
        received: Received | None = None
        try:
            self._outbox.send(Frame(Kind.PING, rid), time.monotonic() + timeout_s)
            received = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self._pings.pop(rid, None)
        return self._health_report(received, timeout_s)

    def _health_report(self, received: Received | None, timeout_s: float) -> PipelineHealth:
        frame = received.frame if received is not None else None
        answered = {s.stage: s for s in frame.statuses} if frame is not None else {}
        error = frame.error if frame is not None else None
        unreachable = {k + 1: why for k, why in self._broken.items()}
        if error is not None:
            unreachable[error.stage + 1] = error.message
        stages = []
        for i in range(self.stages):
            if i in answered:
                stages.append(StageHealth(i, answered[i].ready, answered[i].detail))
            elif i in unreachable:
                stages.append(StageHealth(i, False, f"unreachable: {unreachable[i]}"))
            elif frame is None:
                stages.append(StageHealth(i, False, f"no answer within {timeout_s:.3f} s"))
            else:
                stages.append(StageHealth(i, False, "not reached"))
        ready = frame is not None and error is None and all(s.ready for s in stages)
        if ready:
            self._broken.clear()
            return PipelineHealth(True, tuple(stages))
        if error is not None:
            detail = error.message
        elif frame is None:
            detail = f"the health probe did not come back within {timeout_s:.3f} s"
            if self._broken:
                detail += f" ({self._known_breaks()})"
        else:
            detail = "; ".join(f"stage {s.stage}: {s.detail}" for s in stages if not s.ready)
        return PipelineHealth(False, tuple(stages), detail)

    async def close(self) -> None:
        """Stop listening, close the connection to stage 0 and fail what is still pending."""
        if self._state == "closed":
            return
        self._state = "closed"
        await self._outbox.close()
        await self._results.close()
        for entry in self._pending.values():
            if not entry.future.done():
                entry.future.set_exception(StageUnavailable("the pipeline was closed"))
        for fut in self._pings.values():
            if not fut.done():
                fut.cancel()
