"""The gateway side of the Redis Streams transport: a :class:`~layerline.runtime.api.Pipeline`.

``infer`` adds the request to stage 0's stream and waits for its answer on this gateway's own reply
stream (``<prefix>:reply:<g>``, ``g`` from ``INCR <prefix>:gateways``), read by one background blocking
``XREAD``. Request ids are ``g << 32 | n``, unique across gateways sharing a prefix (the stages'
idempotency keys use them). The first answer of a request wins; duplicates are counted and dropped.
A request of ``blob_min_bytes`` or more travels as a blob (:mod:`layerline.runtime.redis_entries`);
answers that are blobs are fetched with ``GETDEL``.

[Note: Redis going away] Adding a request is retried while the connection is down, until the request's
deadline. Each request is added by a script that checks the server's epoch token (see
``redis_entries``), so the gateway knows which data it is in: when a reconnect finds that the server
lost its data (restarted without persistence), every request added before is failed at once with
``StageUnavailable`` (it can never be answered) instead of waiting for its deadline. A server that
kept its data (AOF) loses nothing: requests in flight carry on.

Health: stage k is ready when at least one of its consumers is alive: each replica refreshes
``<prefix>:alive:<k>:<consumer>`` (TTL 3 s) at least every second. ``XINFO CONSUMERS`` idle time cannot
serve: on Redis 7.0 it only moves when a consumer is handed entries, so an idle replica looks dead.
``XINFO CONSUMERS`` still gives the pending counts in the report (see ``docs/redis.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import DeadlineExceeded, StageUnavailable
from layerline.runtime.api import InferResult, PipelineHealth, StageHealth, StageTiming
from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES, ErrorInfo, Frame, Kind, decode
from layerline.runtime.pipeline import _ERRORS, DirectPipeline, _budget_margin
from layerline.runtime.redis_entries import (
    DEFAULT_BLOB_MIN_BYTES,
    GATEWAY_ID_LUA,
    SUBMIT_LUA,
    StreamKeys,
    blob_ttl_ms,
    ensure_group,
    entry_args,
    frame_align,
    frame_chunks,
    sync_epoch,
)
from layerline.runtime.redis_resp import RespConnection, RespError

__all__ = ["RedisPipeline", "StageLoad"]

log = logging.getLogger(__name__)

_BLOB_TTL_MS = 3_600_000


@dataclass(frozen=True)
class StageLoad:
    """What an autoscaler looks at for one stage: live replicas, entries delivered but not yet handed
    on (``pending``, held by replicas alive or dead), entries not delivered yet (``waiting``)."""

    stage: int
    live: int
    pending: int
    waiting: int


class RedisPipeline:
    """Requests through ``stages`` stages whose workers consume ``<prefix>:s<k>`` on Redis at ``url``."""

    def __init__(
        self,
        url: str,
        *,
        stages: int,
        prefix: str = "layerline",
        max_in_flight: int = 64,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        block_ms: int = 1000,
        budget_margin_s: float | None = None,
        blob_min_bytes: int = DEFAULT_BLOB_MIN_BYTES,
        elastic_stages: Collection[int] = (),
    ) -> None:
        if stages < 1:
            raise ValueError(f"a pipeline needs at least one stage, got stages={stages}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.url = url
        self.stages = stages
        self.keys = StreamKeys(prefix)
        self.max_in_flight = max_in_flight
        self.max_frame_bytes = max_frame_bytes
        self.block_ms = block_ms
        self.budget_margin_s = budget_margin_s
        self.blob_min_bytes = blob_min_bytes
        #: stages an autoscaler may scale to zero: no live consumer there is "waiting to be woken", not broken
        self.elastic_stages = frozenset(int(k) for k in elastic_stages)
        self.duplicate_replies = 0
        self.lost_requests = 0  # failed because the server lost its data
        self.gateway_id = 0
        self.reply_stream = ""
        self.epoch = ""
        self._conn = RespConnection(url, name="gateway", on_connect=self._on_connect, align=frame_align)
        self._reader_conn = RespConnection(  # its own connection: the blocking XREAD holds it
            url, name="gateway replies", on_connect=self._on_connect, align=frame_align
        )
        self._reader: asyncio.Task | None = None
        self._last = "0-0"
        self._cleanups: set[asyncio.Future] = set()
        # rid → (answer, epoch it was added in; "" while it is being added)
        self._pending: dict[int, tuple[asyncio.Future, str]] = {}
        self._answered: set[int] = set()  # ids answered recently (to count duplicates)
        self._ids = itertools.count(1)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._state = "new"

    @property
    def in_flight(self) -> int:
        """Requests added to Redis and not answered yet."""
        return sum(1 for _fut, epoch in self._pending.values() if epoch)

    async def _on_connect(self, run: Any) -> None:
        await self._check_epoch(run)
        for k in range(self.stages):
            await ensure_group(run, self.keys.stage(k), self.keys.group(k))

    async def _check_epoch(self, run: Any) -> None:
        token, lost = await sync_epoch(run, self.keys, self.epoch)
        self.epoch = token
        if lost:
            self._lost(token)
            if self.gateway_id:
                await run("EVAL", GATEWAY_ID_LUA, 1, self.keys.gateways, self.gateway_id)

    def _lost(self, token: str) -> None:
        doomed = [(rid, fut) for rid, (fut, epoch) in self._pending.items() if epoch and epoch != token]
        log.warning(
            "Redis at %s lost its data (restarted without persistence?): failing the %d request(s) in flight",
            self.url,
            len(doomed),
        )
        self._last = "0-0"
        for rid, fut in doomed:
            if not fut.done():
                self.lost_requests += 1
                fut.set_exception(
                    StageUnavailable(
                        f"request {rid} was lost: Redis at {self.url} restarted without its data while the "
                        "request was queued or computing; send it again (run Redis with appendonly yes to "
                        "keep requests across restarts)"
                    )
                )

    async def start(self) -> None:
        """Connect, take a gateway number, create the stage groups and start reading replies."""
        if self._state != "new":
            raise RuntimeError(f"RedisPipeline.start() called on a pipeline that is {self._state}")
        try:
            self.gateway_id = int(await self._conn.execute("INCR", self.keys.gateways))
        except (OSError, RespError) as exc:
            self._conn.close()
            raise StageUnavailable(
                f"cannot reach Redis at {self.url}: {exc}; start it or fix --redis-url"
            ) from exc
        self.reply_stream = self.keys.reply(self.gateway_id)
        self._reader = asyncio.create_task(self._read_replies(), name="redis-replies")
        self._state = "started"

    def _check_started(self) -> None:
        if self._state != "started":
            raise RuntimeError(f"RedisPipeline is {self._state}; call start() first (and not after close())")

    async def infer(self, inputs: Mapping[str, np.ndarray], timeout_s: float) -> InferResult:
        """Run one request through the stages (see :class:`~layerline.runtime.api.Pipeline`)."""
        self._check_started()
        t0 = time.monotonic()
        tensors = DirectPipeline._wire_inputs(inputs)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"request waited {timeout_s:.3f} s at the gateway behind {self.max_in_flight} requests "
                "in flight; raise max_in_flight or the timeout, or add replicas"
            ) from None
        rid = (self.gateway_id << 32) | (next(self._ids) & 0xFFFFFFFF)
        fut = asyncio.get_running_loop().create_future()
        try:
            margin = _budget_margin(timeout_s) if self.budget_margin_s is None else self.budget_margin_s
            left = timeout_s - (time.monotonic() - t0)
            deadline_wall = time.time() + left - margin
            chunks = frame_chunks(Frame(Kind.DATA, rid, tensors), self.max_frame_bytes)
            await self._submit(rid, fut, chunks, deadline_wall, t0 + timeout_s)
            try:
                frame = await asyncio.wait_for(fut, max(0.0, timeout_s - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"request {rid} got no answer within {timeout_s:.3f} s (queued on {self.keys.stage(0)}; "
                    "check `health`: a stage with no live consumer holds requests until one starts)"
                ) from None
        finally:
            self._pending.pop(rid, None)
            self._slots.release()
        timings = tuple(
            StageTiming(t.stage, t.queue_ms / 1000.0, t.compute_ms / 1000.0, 0.0) for t in frame.trace
        )
        return InferResult(dict(frame.tensors), timings, time.monotonic() - t0)

    async def _submit(
        self, rid: int, fut: asyncio.Future, chunks: Any, deadline_wall: float, until: float
    ) -> None:
        """Add the request to stage 0's stream, retrying while Redis is unreachable (until ``until``)."""
        stream = self.keys.stage(0)
        self._pending[rid] = (fut, "")  # before it is added: its answer may come back at once
        backoff = 0.05
        while True:
            epoch = self.epoch
            if chunks.nbytes >= self.blob_min_bytes:
                blob = self.keys.blob("0", rid)
                ttl = blob_ttl_ms(deadline_wall, _BLOB_TTL_MS)
                body = entry_args(rid, self.reply_stream, deadline_wall, blob=blob)
                commands: list[tuple] = [("SET", blob, chunks, "PX", ttl)]
            else:
                body = entry_args(rid, self.reply_stream, deadline_wall, frame=chunks)
                commands = []
            commands.append(("EVAL", SUBMIT_LUA, 2, self.keys.epoch, stream, epoch, *body))
            try:
                if not epoch:
                    raise ConnectionError("not connected yet")
                replies = await self._conn.pipeline(commands)
                for reply in replies:
                    if isinstance(reply, RespError):
                        raise StageUnavailable(f"Redis at {self.url} refused the request: {reply}")
                if replies[-1] == 1:
                    self._pending[rid] = (fut, epoch)  # now added: lost if this epoch ends
                    return
                error = f"the server lost its data (epoch {epoch} is gone)"
                await self._check_epoch(self._conn.execute)
            except (OSError, RespError) as exc:
                error = str(exc)
            if time.monotonic() + backoff >= until:
                raise StageUnavailable(
                    f"cannot queue request {rid} on Redis at {self.url}: {error}; "
                    "start Redis or fix --redis-url"
                )
            log.info("queueing request %d failed (%s); retrying", rid, error)
            await asyncio.sleep(backoff)
            backoff = min(0.5, backoff * 2)

    async def _read_replies(self) -> None:
        backoff = 0.05
        while True:
            try:
                reply = await self._reader_conn.execute(
                    "XREAD", "COUNT", 64, "BLOCK", self.block_ms, "STREAMS", self.reply_stream, self._last
                )
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (OSError, RespError) as exc:
                log.warning("reading replies from %s failed: %s", self.reply_stream, exc)
                await asyncio.sleep(backoff)
                backoff = min(0.5, backoff * 2)
                continue
            items = [(i, dict(zip(f[::2], f[1::2], strict=True))) for _s, es in reply or [] for i, f in es]
            if not items:
                continue
            self._last = items[-1][0].decode()
            blobs = [fields[b"b"] for _i, fields in items if b"b" in fields]
            values: dict[bytes, Any] = {}
            if blobs:
                try:
                    got = await self._conn.pipeline([("GETDEL", b) for b in blobs])
                    values = dict(zip(blobs, got, strict=True))
                except (OSError, RespError) as exc:
                    log.warning("cannot fetch %d answer(s) from Redis: %s", len(blobs), exc)
            for _i, fields in items:
                data = values.get(fields[b"b"]) if b"b" in fields else fields.get(b"f")
                self._on_reply(data)
            # not awaited: the next XREAD need not wait for it (one connection keeps the order)
            cleanup = asyncio.get_running_loop().create_task(
                self._conn.pipeline([("XDEL", self.reply_stream, *(i for i, _f in items))])
            )
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleaned)

    def _cleaned(self, fut: asyncio.Future) -> None:
        self._cleanups.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:  # left for the stream's deletion at close
            log.debug("deleting read answers failed: %s", fut.exception())

    def _on_reply(self, data: Any) -> None:
        try:
            if not isinstance(data, bytes | memoryview):
                raise ValueError("its frame is missing (a blob that expired?)")
            frame = decode(data, self.max_frame_bytes)
        except Exception as exc:  # a damaged entry must not stop the reader
            log.warning("ignoring an undecodable reply entry: %s", exc)
            return
        rid = frame.request_id
        if rid in self._answered:
            self.duplicate_replies += 1
            log.info("ignoring a duplicate answer for request %d", rid)
            return
        fut = self._pending.get(rid, (None, ""))[0]
        self._answered.add(rid)
        if len(self._answered) > 100_000:
            self._answered = set(sorted(self._answered)[-50_000:])
        if fut is None or fut.done():
            log.debug("discarding the late answer of request %d", rid)
            return
        if frame.kind is Kind.DATA:
            fut.set_result(frame)
        elif frame.kind is Kind.ERROR:
            error = frame.error or ErrorInfo(-1, "protocol", "an ERROR entry without error details")
            fut.set_exception(_ERRORS[error.code](error.message))

    async def health(self, timeout_s: float) -> PipelineHealth:
        """Ready when every stage has at least one live consumer (its ``alive`` key exists)."""
        self._check_started()
        try:
            loads = await asyncio.wait_for(self.stage_loads(), timeout_s)
        except asyncio.TimeoutError:
            return PipelineHealth(False, (), f"Redis at {self.url} did not answer within {timeout_s:.3f} s")
        except (OSError, RespError) as exc:
            return PipelineHealth(False, (), f"cannot reach Redis at {self.url}: {exc}")
        stages = []
        for load in loads:
            k = load.stage
            detail = f"{load.live} live consumer(s), {load.pending} entries pending, {load.waiting} waiting"
            if not load.live and k in self.elastic_stages:
                detail = f"scaled to zero: requests wait in {self.keys.stage(k)} until a replica starts"
            elif not load.live:
                detail = f"no live consumer on {self.keys.stage(k)} (start a worker for stage {k}); {detail}"
            stages.append(StageHealth(k, bool(load.live) or k in self.elastic_stages, detail))
        ready = all(s.ready for s in stages)
        detail = "" if ready else "; ".join(f"stage {s.stage}: {s.detail}" for s in stages if not s.ready)
        return PipelineHealth(ready, tuple(stages), detail)

    async def stage_loads(self) -> list[StageLoad]:
        """Per stage: live replicas, entries they hold, entries in the stream (forgets stopped replicas)."""
        self._check_started()
        out = []
        for k in range(self.stages):
            stream, group = self.keys.stage(k), self.keys.group(k)
            members, consumers, length = await self._conn.pipeline(
                [
                    ("SMEMBERS", self.keys.consumers(k)),
                    ("XINFO", "CONSUMERS", stream, group),
                    ("XLEN", stream),
                ]
            )
            names = sorted(n.decode() for n in members) if isinstance(members, list) else []
            alive = await self._conn.execute("MGET", *(self.keys.alive(k, n) for n in names)) if names else []
            live = {n for n, a in zip(names, alive, strict=True) if a is not None}
            infos = (
                [dict(zip(c[::2], c[1::2], strict=True)) for c in consumers]
                if isinstance(consumers, list)
                else []
            )
            pending = {i[b"name"].decode(): int(i[b"pending"]) for i in infos}
            for name in (set(pending) - live) & set(
                names
            ):  # a stopped replica with nothing pending: forget it
                if pending[name] == 0:
                    await self._conn.pipeline(
                        [
                            ("SREM", self.keys.consumers(k), name),
                            ("XGROUP", "DELCONSUMER", stream, group, name),
                        ]
                    )
            held = sum(pending.values())
            waiting = max(0, int(length) - held) if isinstance(length, int) else 0
            out.append(StageLoad(k, len(live), held, waiting))
        return out

    async def close(self) -> None:
        """Stop reading replies, fail what is pending, delete the reply stream."""
        if self._state == "closed":
            return
        was = self._state
        self._state = "closed"
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for fut, _epoch in self._pending.values():
            if not fut.done():
                fut.set_exception(StageUnavailable("the pipeline was closed"))
        if was == "started":
            with contextlib.suppress(OSError, RespError):
                await asyncio.wait_for(self._conn.execute("DEL", self.reply_stream), 2.0)
        self._conn.close()
        self._reader_conn.close()
