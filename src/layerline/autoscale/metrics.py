"""What the autoscaler reads from Redis per stage, and the Prometheus metrics it exports.

:class:`RedisStageMetrics` reads, for each stage stream ``<prefix>:s<k>`` (``docs/redis.md``): its
length (``XLEN``), the entries delivered to a replica and not handed on yet (``pending``, from the
``XPENDING`` summary), the entries not delivered yet (``lag`` = length − pending: a stage deletes an
entry when it hands it on, so everything left in the stream is either pending or not delivered; the
``lag`` field of ``XINFO GROUPS`` is not used because Redis cannot compute it once entries have been
deleted), the age of the oldest pending entry (from its id: the time it was added to this stage's
stream, against the server's ``TIME``), and the replicas with a live heartbeat. It only reads.

:class:`AutoscaleMetrics` follows the gateway's conventions (:mod:`layerline.serve.metrics`): its own
registry, ``layerline_`` names, a ``stage`` label, seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from layerline.runtime.redis_entries import StreamKeys
from layerline.runtime.redis_resp import RespConnection, RespError
from layerline.serve.metrics import CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "AutoscaleMetrics", "RedisStageMetrics", "StageMetrics"]


@dataclass(frozen=True)
class StageMetrics:
    """One stage's stream at one poll (see the module docstring)."""

    stage: int
    length: int
    lag: int
    pending: int
    oldest_pending_age_s: float
    live: int
    #: pending entries delivered more than once (taken over from a dead or stuck replica: retries under way)
    redelivered: int = 0
    #: entries in the deployment's dead-letter stream (the same for every stage)
    dead_letters: int = 0

    @property
    def backlog(self) -> int:
        """What the policy scales on: entries not delivered yet plus entries being worked on."""
        return self.lag + self.pending


def _ms(entry_id: Any) -> int | None:
    if not isinstance(entry_id, bytes | str):
        return None
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    head = text.split("-", 1)[0]
    return int(head) if head.isdigit() else None


#: Commands per stage in one poll's pipeline; pending entries looked at for redeliveries (the oldest).
PER_STAGE = 4
REDELIVERY_SCAN = 100


class RedisStageMetrics:
    """Reads :class:`StageMetrics` of ``stages`` stages of the deployment with key ``prefix``."""

    def __init__(self, url: str, *, stages: int, prefix: str) -> None:
        if stages < 1:
            raise ValueError(f"need at least one stage, got {stages}")
        self.url = url
        self.stages = stages
        self.keys = StreamKeys(prefix)
        self._conn = RespConnection(url, name="autoscaler")

    async def read(self) -> list[StageMetrics]:
        """Every stage's metrics, in one round trip plus one for the heartbeats (OSError/RespError when
        Redis cannot be reached)."""
        commands: list[tuple[Any, ...]] = [("TIME",)]
        for k in range(self.stages):
            stream = self.keys.stage(k)
            commands += [
                ("XLEN", stream),
                ("XPENDING", stream, self.keys.group(k)),
                ("SMEMBERS", self.keys.consumers(k)),
                ("XPENDING", stream, self.keys.group(k), "-", "+", REDELIVERY_SCAN),
            ]
        commands.append(("XLEN", self.keys.dead))
        replies = await self._conn.pipeline(commands)
        dead = replies[-1] if isinstance(replies[-1], int) else 0
        now = replies[0]
        if isinstance(now, RespError):
            raise now
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        names: list[list[str]] = []
        for k in range(self.stages):
            members = replies[1 + PER_STAGE * k + 2]
            names.append(sorted(m.decode() for m in members) if isinstance(members, list) else [])
        alive_keys = [self.keys.alive(k, n) for k in range(self.stages) for n in names[k]]
        alive = await self._conn.execute("MGET", *alive_keys) if alive_keys else []
        out = []
        at = 0
        for k in range(self.stages):
            length, summary, _members, entries = replies[1 + PER_STAGE * k : 1 + PER_STAGE * (k + 1)]
            length = length if isinstance(length, int) else 0
            pending, age = 0, 0.0
            if isinstance(summary, list) and summary and isinstance(summary[0], int):  # NOGROUP: none
                pending = summary[0]
                oldest = _ms(summary[1]) if pending else None
                age = max(0.0, (now_ms - oldest) / 1000.0) if oldest is not None else 0.0
            live = sum(1 for a in alive[at : at + len(names[k])] if a is not None)
            at += len(names[k])
            redelivered = (
                sum(1 for e in entries if isinstance(e, list) and len(e) > 3 and int(e[3]) > 1)
                if isinstance(entries, list)
                else 0
            )
            out.append(
                StageMetrics(k, length, max(0, length - pending), pending, age, live, redelivered, dead)
            )
        return out

    def close(self) -> None:
        self._conn.close()


class AutoscaleMetrics:
    """The autoscaler's gauges and counters, in a registry of their own."""

    def __init__(self, stages: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        label = ["stage"]
        self.desired = Gauge(
            "layerline_autoscale_replicas_desired",
            "Replicas the autoscaler wants per stage.",
            label,
            registry=r,
        )
        self.running = Gauge(
            "layerline_autoscale_replicas_running", "Replicas of the stage running now.", label, registry=r
        )
        self.length = Gauge(
            "layerline_autoscale_stream_length", "Entries in the stage's stream (XLEN).", label, registry=r
        )
        self.lag = Gauge(
            "layerline_autoscale_lag",
            "Entries of the stage's stream not delivered to any replica yet.",
            label,
            registry=r,
        )
        self.pending = Gauge(
            "layerline_autoscale_pending",
            "Entries delivered to a replica of the stage and not handed on yet.",
            label,
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "layerline_autoscale_oldest_pending_age_seconds",
            "Time since the oldest pending entry of the stage was added to its stream.",
            label,
            registry=r,
        )
        self.live = Gauge(
            "layerline_autoscale_live_consumers",
            "Replicas of the stage with a live heartbeat in Redis.",
            label,
            registry=r,
        )
        self.decisions = Counter(
            "layerline_autoscale_decisions",
            "Scaling decisions carried out, by stage and direction (up, down).",
            ["stage", "direction"],
            registry=r,
        )
        self.failures = Counter(
            "layerline_autoscale_scale_failures",
            "Scaling operations that failed (a replica that did not start, ...).",
            label,
            registry=r,
        )
        self.redelivered = Gauge(
            "layerline_autoscale_redelivered_pending",
            "Pending entries of the stage delivered more than once (retries under way; oldest 100 seen).",
            label,
            registry=r,
        )
        self.dead_letters = Gauge(
            "layerline_dead_letter_entries",
            "Entries in the deployment's dead-letter stream (requests that failed every retry).",
            registry=r,
        )
        self.read_errors = Counter(
            "layerline_autoscale_read_errors", "Polls whose Redis read failed.", registry=r
        )
        for k in range(stages):
            stage = str(k)
            for direction in ("up", "down"):
                self.decisions.labels(stage, direction)
            self.failures.labels(stage)

    def observe(self, metrics: StageMetrics) -> None:
        stage = str(metrics.stage)
        self.length.labels(stage).set(metrics.length)
        self.lag.labels(stage).set(metrics.lag)
        self.pending.labels(stage).set(metrics.pending)
        self.oldest_pending_age.labels(stage).set(metrics.oldest_pending_age_s)
        self.live.labels(stage).set(metrics.live)
        self.redelivered.labels(stage).set(metrics.redelivered)
        self.dead_letters.set(metrics.dead_letters)

    def replicas(self, stage: int, running: int, desired: int) -> None:
        self.running.labels(str(stage)).set(running)
        self.desired.labels(str(stage)).set(desired)

    def render(self) -> bytes:
        """The registry in Prometheus text format 0.0.4."""
        return generate_latest(self.registry)
