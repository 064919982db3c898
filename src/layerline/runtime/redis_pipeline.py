"""The gateway side of the Redis Streams transport: a :class:`~layerline.runtime.api.Pipeline`.

``infer`` adds the request to stage 0's stream (``XADD``) and waits for its answer on this gateway's
own reply stream (``<prefix>:reply:<g>``, ``g`` from ``INCR <prefix>:gateways``), read by one background
``XREAD``. Request ids are ``g << 32 | n``, unique across gateways sharing a prefix (the stages'
idempotency keys use them). The first answer of a request wins; duplicates are counted and dropped.

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
from collections.abc import Mapping
from typing import Any

import numpy as np
from redis.exceptions import RedisError, ResponseError

from layerline.errors import DeadlineExceeded, StageUnavailable
from layerline.runtime.api import InferResult, PipelineHealth, StageHealth, StageTiming
from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES, ErrorInfo, Frame, Kind, decode
from layerline.runtime.pipeline import _ERRORS, DirectPipeline, _budget_margin
from layerline.runtime.redis_transport import StreamKeys, connect, encode_entry, ensure_group

__all__ = ["RedisPipeline"]

log = logging.getLogger(__name__)


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
        self.duplicate_replies = 0
        self.gateway_id = 0
        self.reply_stream = ""
        self._client: Any = None
        self._reader_client: Any = None  # its own connection: the blocking XREAD holds one
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._answered: set[int] = set()  # ids answered recently (to count duplicates)
        self._ids = itertools.count(1)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._state = "new"

    async def start(self) -> None:
        """Connect, take a gateway number, create the stage groups and start reading replies."""
        if self._state != "new":
            raise RuntimeError(f"RedisPipeline.start() called on a pipeline that is {self._state}")
        self._client = connect(self.url)
        self._reader_client = connect(self.url, max_connections=1)
        try:
            self.gateway_id = int(await self._client.incr(self.keys.gateways))
            for k in range(self.stages):
                await ensure_group(self._client, self.keys.stage(k), self.keys.group(k))
        except (RedisError, OSError) as exc:
            await self._client.aclose()
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
        self._pending[rid] = fut
        try:
            margin = _budget_margin(timeout_s) if self.budget_margin_s is None else self.budget_margin_s
            left = timeout_s - (time.monotonic() - t0)
            args = encode_entry(
                Frame(Kind.DATA, rid, tensors),
                self.reply_stream,
                time.time() + left - margin,
                self.max_frame_bytes,
            )
            try:
                await self._client.xadd(self.keys.stage(0), dict(zip(args[1::2], args[2::2], strict=True)))
            except (RedisError, OSError) as exc:
                raise StageUnavailable(f"cannot queue the request on Redis at {self.url}: {exc}") from exc
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

    async def _read_replies(self) -> None:
        last = "0-0"
        while True:
            try:
                reply = await self._reader_client.xread(
                    {self.reply_stream: last}, count=64, block=self.block_ms
                )
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("reading replies from %s failed: %s", self.reply_stream, exc)
                await asyncio.sleep(0.5)
                continue
            ids = []
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    last = entry_id
                    self._on_reply(fields)
            if ids:
                with contextlib.suppress(RedisError, OSError):
                    await self._client.xdel(self.reply_stream, *ids)

    def _on_reply(self, fields: dict) -> None:
        try:
            frame = decode(fields[b"f"], self.max_frame_bytes)
        except Exception as exc:  # a damaged entry must not stop the reader
            log.warning("ignoring an undecodable reply entry: %s", exc)
            return
        rid = frame.request_id
        if rid in self._answered:
            self.duplicate_replies += 1
            log.info("ignoring a duplicate answer for request %d", rid)
            return
        fut = self._pending.get(rid)
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
            infos = await asyncio.wait_for(self._consumers(), timeout_s)
        except asyncio.TimeoutError:
            return PipelineHealth(False, (), f"Redis at {self.url} did not answer within {timeout_s:.3f} s")
        except (RedisError, OSError) as exc:
            return PipelineHealth(False, (), f"cannot reach Redis at {self.url}: {exc}")
        stages = []
        for k, (live, consumers, length) in enumerate(infos):
            pending = sum(int(c["pending"]) for c in consumers)
            detail = f"{len(live)} live consumer(s), {pending} entries pending, {length} in the stream"
            if not live:
                detail = f"no live consumer on {self.keys.stage(k)} (start a worker for stage {k}); {detail}"
            stages.append(StageHealth(k, bool(live), detail))
        ready = all(s.ready for s in stages)
        detail = "" if ready else "; ".join(f"stage {s.stage}: {s.detail}" for s in stages if not s.ready)
        return PipelineHealth(ready, tuple(stages), detail)

    async def _consumers(self) -> list[tuple[list[str], list[dict], int]]:
        out = []
        for k in range(self.stages):
            stream, group = self.keys.stage(k), self.keys.group(k)
            names = sorted(n.decode() for n in await self._client.smembers(self.keys.consumers(k)))
            alive = await self._client.mget([self.keys.alive(k, n) for n in names]) if names else []
            live = [n for n, a in zip(names, alive, strict=True) if a is not None]
            try:
                consumers = await self._client.xinfo_consumers(stream, group)
            except ResponseError:  # no such stream or group yet
                consumers = []
            gone = {c["name"].decode() for c in consumers if int(c["pending"]) == 0} - set(live)
            for name in gone & set(names):  # a stopped replica with nothing pending: forget it
                await self._client.srem(self.keys.consumers(k), name)
                await self._client.xgroup_delconsumer(stream, group, name)
            out.append((live, consumers, await self._client.xlen(stream)))
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
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(StageUnavailable("the pipeline was closed"))
        if was == "started":
            with contextlib.suppress(RedisError, OSError):
                await self._client.delete(self.reply_stream)
            for client in (self._client, self._reader_client):
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
