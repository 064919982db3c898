"""A Redis stage's outbox: hands each result on (:class:`RedisOutbox`).

How a hand-off works: [Note: hand-off] in :mod:`layerline.runtime.redis_transport`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from layerline.errors import ProtocolError, StageUnavailable
from layerline.runtime.framing import Frame
from layerline.runtime.redis_entries import Entry, blob_ttl_ms, entry_args, frame_chunks
from layerline.runtime.redis_resp import RespError
from layerline.runtime.transport import BackwardHandler, LinkHandler

if TYPE_CHECKING:
    from layerline.runtime.redis_transport import RedisStageLink

__all__ = ["RedisOutbox"]

log = logging.getLogger(__name__)

_NO_DEADLINE_RETRY_S = 30.0  # how long a hand-off is retried when its entry has no deadline


class RedisOutbox:
    """Writes each result to the next stage's stream (or the reply stream) and acknowledges its entry."""

    def __init__(self, link: RedisStageLink) -> None:
        self._link = link
        self._tasks: set[asyncio.Task] = set()
        self._started = False

    @property
    def connected(self) -> bool:
        """Always, once started: a hand-off waits for the broker (retried until the entry's deadline)."""
        return self._started

    @property
    def peer(self) -> str:
        return self._link.next_stream or "the gateway's reply stream"

    @property
    def last_error(self) -> str:
        return self._link.last_error

    async def start(self, on_backward: BackwardHandler, on_link: LinkHandler) -> None:
        await self._link.open()
        self._started = True

    def send(self, frame: Frame, deadline: float | None = None) -> asyncio.Future[float]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        entry = self._link.held.get(frame.request_id)
        if entry is None:
            fut.set_exception(StageUnavailable(f"request {frame.request_id} is not held by this replica"))
            return fut
        task = loop.create_task(self._write(frame, entry, fut))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def _write(self, frame: Frame, entry: Entry, fut: asyncio.Future) -> None:
        link = self._link
        t0 = time.monotonic()
        try:
            chunks = frame_chunks(frame, link.max_frame_bytes)
        except ProtocolError as exc:
            fut.set_exception(exc)
            return
        dest = entry.reply if link.next_stream is None else link.next_stream
        target = "r" if link.next_stream is None else str(link.stage + 1)
        until = time.time() + _NO_DEADLINE_RETRY_S if entry.deadline_wall is None else entry.deadline_wall
        backoff = 0.05
        while True:
            blob, before, body = "", (), None
            if chunks.nbytes >= link.blob_min_bytes:
                blob = link.keys.blob(target, entry.rid)
                ttl = blob_ttl_ms(entry.deadline_wall, link.done_ttl_ms)
                before = ("SET", blob, chunks, "PX", ttl)
                body = entry_args(entry.rid, entry.reply, entry.deadline_wall, blob=blob)
            else:
                body = entry_args(entry.rid, entry.reply, entry.deadline_wall, frame=chunks)
            try:
                written = await link.finish(entry, [(dest, body)], blob=blob, before=before)
                break
            except (OSError, RespError) as exc:
                link.broken(exc)
                if isinstance(exc, RespError) or time.time() + backoff >= until or entry.rid not in link.held:
                    link.held.pop(entry.rid, None)
                    fut.set_exception(StageUnavailable(f"stage {link.stage} cannot write to Redis: {exc}"))
                    return
                log.warning(
                    "stage %d: handing on request %d failed, retrying: %s", link.stage, entry.rid, exc
                )
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
        link.up, link.last_error = True, ""
        if written == 0:
            log.info("stage %d: request %d was already handed on (duplicate)", link.stage, entry.rid)
        elif written < 0:
            log.info(
                "stage %d: request %d is from before Redis lost its data: dropped", link.stage, entry.rid
            )
        if link.held.get(entry.rid) is entry:
            del link.held[entry.rid]
        fut.set_result(time.monotonic() - t0)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._link.close()
