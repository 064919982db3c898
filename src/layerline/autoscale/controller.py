"""The autoscaling loop: read each stage's stream, ask the policy, drive a ReplicaScaler.

Every ``interval_s`` the controller reads :class:`~layerline.autoscale.metrics.StageMetrics` of every
stage, asks :class:`~layerline.autoscale.policy.ScalingPolicy` for each stage's replica count (given the
replicas running now) and, where that differs, calls ``scaler.scale(stage, n)`` in a thread of its own:
a scale-down waits for the stopped replicas to drain, a scale-up for the new ones to consume, and the
other stages keep being watched meanwhile (one operation per stage at a time; a stage with one in
progress is not decided on). Every decision carried out is logged (stage, from, to, reason) and counted
in the Prometheus metrics; a failed operation is logged and counted, and tried again at a later poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from layerline.autoscale.metrics import AutoscaleMetrics, StageMetrics
from layerline.autoscale.policy import AutoscaleConfig, Decision, ScalingPolicy
from layerline.runtime.redis_resp import RespError
from layerline.runtime.scaling import ReplicaScaler

__all__ = ["AutoscaleController", "MetricsSource"]

log = logging.getLogger(__name__)


class MetricsSource(Protocol):
    """Where the controller reads the stages' loads (``RedisStageMetrics``)."""

    async def read(self) -> list[StageMetrics]: ...


class AutoscaleController:
    """Drives ``scaler`` from ``source`` with ``config`` (module docstring).

    ``clock``: monotonic seconds for the policy; ``on_decision``: called (in the event loop) with each
    decision that changes a count, before it is carried out.
    """

    def __init__(
        self,
        scaler: ReplicaScaler,
        source: MetricsSource,
        config: AutoscaleConfig,
        *,
        metrics: AutoscaleMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        if len(config.stages) != scaler.stage_count:
            raise ValueError(
                f"the autoscale config has {len(config.stages)} stage policies for "
                f"{scaler.stage_count} stages"
            )
        self.scaler = scaler
        self.source = source
        self.config = config
        self.policy = ScalingPolicy(config)
        self.metrics = metrics or AutoscaleMetrics(len(config.stages))
        self.clock = clock
        self.on_decision = on_decision
        self.decisions: list[tuple[float, Decision]] = []  # carried out (clock time, decision)
        self.last: list[StageMetrics] = []
        self._busy: dict[int, asyncio.Future] = {}
        self._desired: dict[int, int] = {}

    @property
    def busy_stages(self) -> list[int]:
        """Stages with a scaling operation in progress."""
        return sorted(k for k, fut in self._busy.items() if not fut.done())

    async def step(self) -> list[Decision]:
        """One poll: read, decide, start the scaling operations; the decisions that change a count."""
        try:
            loads = await self.source.read()
        except (OSError, RespError) as exc:
            self.metrics.read_errors.inc()
            log.warning("cannot read the stages' streams: %s", exc)
            return []
        self.last = loads
        now = self.clock()
        changes = []
        for load in loads:
            k = load.stage
            self.metrics.observe(load)
            running = await asyncio.to_thread(self.scaler.replicas, k)
            self.metrics.replicas(k, running, self._desired.get(k, running))
            if k in self.busy_stages:
                continue
            decision = self.policy.decide(k, running, load.backlog, now)
            if not decision.changes:
                self._desired[k] = running
                continue
            changes.append(decision)
            self._carry_out(decision, load)
        return changes

    def _carry_out(self, decision: Decision, load: StageMetrics) -> None:
        k = decision.stage
        log.info(
            "stage %d: %d → %d replicas (%s; lag %d, pending %d, oldest pending %.1f s)",
            k,
            decision.current,
            decision.desired,
            decision.reason,
            load.lag,
            load.pending,
            load.oldest_pending_age_s,
        )
        self.decisions.append((self.clock(), decision))
        self._desired[k] = decision.desired
        self.metrics.decisions.labels(str(k), decision.direction).inc()
        self.metrics.replicas(k, decision.current, decision.desired)
        if self.on_decision is not None:
            self.on_decision(decision)
        self._busy[k] = _in_thread(self.scaler.scale, k, decision.desired)
        self._busy[k].add_done_callback(lambda fut, d=decision: self._done(d, fut))

    def _done(self, decision: Decision, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.metrics.failures.labels(str(decision.stage)).inc()
            self._desired.pop(decision.stage, None)
            log.error(
                "stage %d: scaling %d → %d failed: %s",
                decision.stage,
                decision.current,
                decision.desired,
                exc,
            )

    async def run(self, stop: asyncio.Event, on_poll: Callable[[], Awaitable[None]] | None = None) -> None:
        """Poll every ``config.interval_s`` until ``stop`` is set; then wait (briefly) for operations in
        progress: a drain that outlasts 5 s goes on in the stopped replica without the controller."""
        while not stop.is_set():
            started = self.clock()
            await self.step()
            if on_poll is not None:
                await on_poll()
            left = self.config.interval_s - (self.clock() - started)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, left))
        pending = [f for f in self._busy.values() if not f.done()]
        if pending:
            log.info("waiting for %d scaling operation(s) in progress", len(pending))
            await asyncio.wait(pending, timeout=5.0)


def _in_thread(fn: Callable[..., object], *args: object) -> asyncio.Future:
    """Run ``fn(*args)`` in a daemon thread (an interpreter exiting does not wait for it); its future."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(result: object, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def body() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the future; logged by the controller
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name=f"scale-{getattr(fn, '__name__', 'op')}", daemon=True).start()
    return fut
