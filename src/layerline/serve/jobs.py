"""The gateway's store of asynchronous requests (``/v1/requests``), kept in the gateway's memory.

A :class:`Job` is one request accepted by ``POST /v1/requests``: it waits ``queued`` for one of
``concurrency`` slots, runs (``running``) as an asyncio task, and ends ``succeeded`` (its encoded result is
kept), ``failed`` (the error is kept), or ``cancelled``. A finished job is kept for ``ttl_s``; then, or
earlier when the byte budget needs the room (oldest finished first), it becomes ``expired``: a small
tombstone without the result, itself dropped after another ``ttl_s`` (then the id is unknown).

[Note: one byte budget] ``max_bytes`` bounds everything the store holds: the decoded inputs of queued and
running jobs plus the kept results. Room for a new input or result is made by evicting the oldest
finished results; a submission whose inputs cannot fit beside the other pending inputs is refused
(:class:`StoreFull`, HTTP 503). Nothing survives a gateway restart (see ``docs/http-api.md``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from layerline.errors import InferenceError, StageUnavailable
from layerline.serve.metrics import ASYNC_STATUSES, GatewayMetrics

__all__ = [
    "FINISHED",
    "PENDING",
    "STATUSES",
    "Job",
    "JobResult",
    "JobStore",
    "StoreFull",
    "iso_time",
]

log = logging.getLogger(__name__)

STATUSES = ASYNC_STATUSES
PENDING = frozenset({"queued", "running"})
FINISHED = frozenset({"succeeded", "failed", "cancelled"})

#: The most expired ids remembered (answering 410 rather than 404) at once.
MAX_TOMBSTONES = 10_000


class StoreFull(StageUnavailable):
    """The async store holds as many pending requests (or bytes) as it may (HTTP 503, Retry-After)."""


@dataclass(frozen=True)
class JobResult:
    """An encoded result, ready to be sent: the body and its headers (Content-Type, ...)."""

    body: bytes
    headers: dict[str, str]


def iso_time(t: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds (``2025-01-02T03:04:05.678Z``); None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Job:
    """One asynchronous request and what is known of it."""

    def __init__(self, job_id: str, input_bytes: int) -> None:
        self.id = job_id
        self.status = "queued"
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.expires_at: float | None = None  # wall clock, for the status document
        self.finished_mono = 0.0
        self.error: str | None = None
        self.error_status: int | None = None  # the HTTP status of a failure, for GET .../result
        self.result: JobResult | None = None
        self.input_bytes = input_bytes
        self.task: asyncio.Task | None = None
        self.done = asyncio.Event()

    @property
    def status_url(self) -> str:
        return f"/v1/requests/{self.id}"

    def to_json(self) -> dict[str, Any]:
        """The status document of ``GET /v1/requests/{id}``."""
        doc: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "created_at": iso_time(self.created_at),
            "started_at": iso_time(self.started_at),
            "finished_at": iso_time(self.finished_at),
            "expires_at": iso_time(self.expires_at),
            "status_url": self.status_url,
        }
        if self.status == "succeeded":
            doc["result_url"] = self.status_url + "/result"
        if self.error is not None:
            doc["error"] = self.error
        return doc


class JobStore:
    """Bounded in-memory store of asynchronous requests; every method runs on the gateway's event loop."""

    def __init__(
        self,
        *,
        max_pending: int,
        concurrency: int,
        ttl_s: float,
        max_bytes: int,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pending, self.concurrency, self.ttl_s, self.max_bytes = (
            max_pending,
            concurrency,
            ttl_s,
            max_bytes,
        )
        self.metrics = metrics
        self.clock = clock
        self.inputs_bytes = 0
        self.results_bytes = 0
        self.closing = False
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()  # in the order they finished
        self._tombstones: OrderedDict[str, float] = OrderedDict()  # id -> when it expired (clock)
        self._pending = 0
        self._slots = asyncio.Semaphore(concurrency)

    # -- bookkeeping -------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """How many jobs the store holds in each status."""
        out = dict.fromkeys(STATUSES, 0)
        for job in self._jobs.values():
            out[job.status] += 1
        return out

    def _set_status(self, job: Job, status: str) -> None:
        if self.metrics is not None:
            self.metrics.async_requests.labels(job.status).dec()
            self.metrics.async_requests.labels(status).inc()
        job.status = status

    def _sync_bytes(self) -> None:
        if self.metrics is not None:
            self.metrics.async_results_bytes.set(self.results_bytes)
            self.metrics.async_inputs_bytes.set(self.inputs_bytes)

    def _expire(self, job: Job, reason: str) -> None:
        """Drop a finished job's result; keep a tombstone so that its id answers 410, not 404."""
        assert job.status in FINISHED, job.status
        self._finished.pop(job.id, None)
        if reason == "bytes" and job.result is not None:
            job.error = (
                f"the result ({len(job.result.body)} bytes) was evicted to make room: the gateway keeps at "
                f"most {self.max_bytes} bytes of async inputs and results (async_max_bytes); fetch "
                "results sooner or raise that limit"
            )
        else:
            job.error = (
                f"the request finished as {job.status} at {iso_time(job.finished_at)} and finished requests "
                f"are kept for {self.ttl_s:g} s (async_result_ttl_s)"
                + (f"; it said: {job.error}" if job.error else "")
            )
        if job.result is not None:
            self.results_bytes -= len(job.result.body)
            job.result = None
        self._set_status(job, "expired")
        self._tombstones[job.id] = self.clock()
        if self.metrics is not None:
            self.metrics.async_evictions.labels(reason).inc()
        self._sync_bytes()

    def sweep(self) -> None:
        """Expire finished jobs older than ``ttl_s``; forget tombstones older than another ``ttl_s``."""
        now = self.clock()
        while self._finished:
            job = next(iter(self._finished.values()))
            if now - job.finished_mono < self.ttl_s:
                break
            self._expire(job, "ttl")
        while self._tombstones:
            job_id, at = next(iter(self._tombstones.items()))
            if now - at < self.ttl_s and len(self._tombstones) <= MAX_TOMBSTONES:
                break
            self._tombstones.popitem(last=False)
            job = self._jobs.pop(job_id)
            if self.metrics is not None:
                self.metrics.async_requests.labels(job.status).dec()

    def _make_room(self, need: int) -> None:
        """Evict the oldest finished results until ``need`` more bytes fit in the budget (if they can)."""
        for job in list(self._finished.values()):
            if self.inputs_bytes + self.results_bytes + need <= self.max_bytes:
                return
            if job.result is not None:
                self._expire(job, "bytes")

    # -- the API of the routes -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None when unknown (or forgotten)."""
        self.sweep()
        return self._jobs.get(job_id)

    def submit(self, work: Callable[[], Awaitable[JobResult]], input_bytes: int) -> Job:
        """Queue ``work`` (which holds the inputs) as a new job; StoreFull when it cannot be taken."""
        self.sweep()
        if self.closing:
            raise StoreFull("the gateway is shutting down; submit the request to another gateway or retry")
        if self._pending >= self.max_pending:
            raise StoreFull(
                f"the gateway already holds {self._pending} queued or running async requests "
                f"(async_max_pending={self.max_pending}); retry later or raise async_max_pending"
            )
        if self.inputs_bytes + input_bytes > self.max_bytes:
            raise StoreFull(
                f"the inputs ({input_bytes} bytes) do not fit beside the {self.inputs_bytes} bytes of "
                f"pending async requests (async_max_bytes={self.max_bytes}); retry later or send smaller "
                "batches"
            )
        self._make_room(input_bytes)
        job = Job(uuid.uuid4().hex, input_bytes)
        self._jobs[job.id] = job
        self._pending += 1
        self.inputs_bytes += input_bytes
        if self.metrics is not None:
            self.metrics.async_requests.labels("queued").inc()
        self._sync_bytes()
        job.task = asyncio.get_running_loop().create_task(self._run(job, work), name=f"async-{job.id}")
        return job

    def cancel(self, job: Job, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued or running job (its task is cancelled, a late result dropped); False if done."""
        if job.status not in PENDING:
            return False
        self._finish(job, "cancelled", error=reason)
        if job.task is not None:
            job.task.cancel()
        return True

    async def close(self) -> None:
        """Refuse new jobs and cancel every pending one (the gateway is stopping)."""
        self.closing = True
        tasks = []
        for job in list(self._jobs.values()):
            if self.cancel(job, "the gateway shut down before the request finished") and job.task:
                tasks.append(job.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- a job's life ----------------------------------------------------------------------------

    async def _run(self, job: Job, work: Callable[[], Awaitable[JobResult]]) -> None:
        try:
            async with self._slots:
                self._set_status(job, "running")
                job.started_at = time.time()
                result = await work()
        except asyncio.CancelledError:
            if job.status in PENDING:  # not through cancel(): the loop is being torn down
                self._finish(job, "cancelled", error="the gateway shut down before the request finished")
            raise
        except InferenceError as exc:
            self._finish(job, "failed", error=str(exc), error_status=exc.http_status)
        except Exception as exc:
            log.exception("async request %s failed in the gateway", job.id)
            self._finish(
                job,
                "failed",
                error=f"internal error in the gateway: {type(exc).__name__}: {exc}",
                error_status=500,
            )
        else:
            if job.status in PENDING:
                self._finish(job, "succeeded", result=result)

    def _finish(
        self,
        job: Job,
        status: str,
        *,
        result: JobResult | None = None,
        error: str | None = None,
        error_status: int | None = None,
    ) -> None:
        assert job.status in PENDING and status in FINISHED, (job.status, status)
        self._pending -= 1
        self.inputs_bytes -= job.input_bytes
        job.input_bytes = 0
        self._set_status(job, status)
        job.error, job.error_status = error, error_status
        job.finished_at = time.time()
        job.finished_mono = self.clock()
        job.expires_at = job.finished_at + self.ttl_s
        self._finished[job.id] = job
        if result is not None:
            job.result = result
            self.results_bytes += len(result.body)
            self._make_room(0)  # may evict this very result, when it alone is over the budget
        if self.metrics is not None:
            self.metrics.async_finished.labels(status).inc()
        self._sync_bytes()
        job.done.set()
