"""A Redis stage's inbox: entries of its stream for this consumer (:class:`RedisInbox`).

Keys, entries and the hand-off are described in :mod:`layerline.runtime.redis_transport`.

[Note: retries] A failure that may be transient (onnxruntime error) leaves the entry pending and records
the error in ``<prefix>:err:<k>:<rid>``; it is retried when reclaimed. An entry delivered more than
``1 + max_retries`` times is moved to ``<prefix>:dead`` with the last error, and the gateway gets an ERROR
(code ``compute``). Failures that cannot improve (bad request, deadline) are answered at once.

[Note: stopping] SIGTERM drains: the replica stops taking entries, finishes and hands on those it holds
(at most its queue plus the read-ahead), then exits; after ``drain_timeout_s`` (or a second signal) it
hands back what is left (``XCLAIM … IDLE``: the other replicas take it over at their next claim round).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from layerline.errors import ProtocolError
from layerline.runtime.framing import ErrorInfo, Frame, Kind, decode
from layerline.runtime.redis_entries import Entry, ensure_group, entry_args, frame_chunks, parse_entry
from layerline.runtime.redis_resp import RespError
from layerline.runtime.transport import ConnectionClosed, Received, UpstreamHandler

if TYPE_CHECKING:
    from layerline.runtime.redis_transport import RedisStageLink

__all__ = ["RedisInbox"]

log = logging.getLogger(__name__)

_RETRYABLE = frozenset({"compute", "unavailable"})


class RedisInbox:
    """Entries of stage k's stream for this consumer: new ones (XREADGROUP) and reclaimed ones."""

    def __init__(self, link: RedisStageLink) -> None:
        self._link = link
        self._ready: deque[Entry] = deque()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.draining = False
        self._busy = 0  # reads and claims under way (entries may be on their way here)

    async def start(self, on_upstream: UpstreamHandler | None = None) -> None:
        await self._link.open()
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="redis-read"),
            asyncio.create_task(self._claim_loop(), name="redis-claim"),
        ]

    def forget(self) -> None:
        """Drop the entries read ahead (after the server lost them)."""
        self._ready.clear()

    async def _read_loop(self) -> None:
        link = self._link
        backoff = 0.05
        while not self._closed:
            if self.draining or len(self._ready) >= link.read_count:  # not taking: stop reading
                await asyncio.sleep(0.005)
                continue
            self._busy += 1
            try:
                reply = await link.reader.execute(
                    "XREADGROUP", "GROUP", link.group, link.consumer, "COUNT", link.read_count,
                    "BLOCK", link.block_ms, "STREAMS", link.stream, ">",
                )  # fmt: skip
                link.up, link.last_error, backoff = True, "", 0.05
                entries = [parse_entry(i, f, link.epoch) for _s, items in reply or [] for i, f in items]
                if entries:
                    await self._accept(entries)
                continue
            except (OSError, RespError) as exc:
                link.broken(exc)
                log.warning("stage %d: reading %s failed: %s", link.stage, link.stream, exc)
                if isinstance(exc, RespError) and exc.code == "NOGROUP":  # deleted by hand: recreate
                    with contextlib.suppress(OSError, RespError):
                        await ensure_group(link.conn.execute, link.stream, link.group)
            finally:
                self._busy -= 1
            await asyncio.sleep(backoff)
            backoff = min(0.5, backoff * 2)

    async def _accept(self, entries: list[Entry]) -> None:
        """Hold ``entries`` (skipping those held already), fetch their blobs, queue them for the worker."""
        link = self._link
        fresh = []
        for entry in entries:
            held = link.held.get(entry.rid)
            if held is not None:
                if held.entry_id != entry.entry_id:
                    log.warning(
                        "request %d: a second entry %s while holding %s", entry.rid, entry.entry_id, held
                    )
                continue  # already queued or computing here
            link.held[entry.rid] = entry
            fresh.append(entry)
        blobs = [e for e in fresh if e.data is None and e.blob]
        if blobs:
            try:
                values = await link.conn.pipeline([("GET", e.blob) for e in blobs])
            except OSError as exc:  # left pending: taken over (or retried here) later
                link.broken(exc)
                for e in blobs:
                    link.held.pop(e.rid, None)
                fresh = [e for e in fresh if e not in blobs]
                values = []
            for entry, value in zip(blobs, values, strict=False):
                if isinstance(value, bytes | memoryview):
                    entry.data = value
                else:
                    fresh.remove(entry)
                    await self._missing(entry)
        for entry in fresh:
            if entry.data is None:  # neither a frame nor a blob: a damaged entry
                entry.data = b""
            if link.held.get(entry.rid) is entry:  # not dropped meanwhile (data loss)
                self._ready.append(entry)
        assert self._wake is not None
        self._wake.set()

    async def _missing(self, entry: Entry) -> None:
        """The entry's blob is gone: it was handed on already, its deadline passed, or it was lost."""
        link = self._link
        try:
            if await link.conn.execute("EXISTS", link.keys.done(link.stage, entry.rid)):
                log.info("stage %d: request %d was already handed on (duplicate)", link.stage, entry.rid)
                await link.conn.pipeline(
                    [("XACK", link.stream, link.group, entry.entry_id), ("XDEL", link.stream, entry.entry_id)]
                )
            elif entry.expired:
                message = (
                    f"stage {link.stage}: the deadline of request {entry.rid} passed while it was queued"
                )
                await self._answer(entry, "deadline", message)
            else:
                message = (
                    f"stage {link.stage}: the input of request {entry.rid} (blob {entry.blob}) is gone from "
                    "Redis: it expired or was evicted (the server needs maxmemory-policy noeviction)"
                )
                log.warning("%s", message)
                await self._answer(entry, "protocol", message)
        except (OSError, RespError) as exc:
            log.warning("stage %d: cannot settle request %d: %s", link.stage, entry.rid, exc)
        finally:
            if link.held.get(entry.rid) is entry:
                del link.held[entry.rid]

    async def _answer(self, entry: Entry, code: str, message: str) -> None:
        error = Frame(Kind.ERROR, entry.rid, error=ErrorInfo(self._link.stage, code, message))
        body = entry_args(entry.rid, entry.reply, None, frame=frame_chunks(error))
        await self._link.finish(entry, [(entry.reply, body)])

    async def _claim_loop(self) -> None:
        """Renew the entries held here; take over those idle too long elsewhere; dead-letter poison."""
        link = self._link
        while not self._closed:
            await asyncio.sleep(link.heartbeat_s)
            try:
                await link.heartbeat()
                held = [e.entry_id for e in link.held.values()]
                if held:
                    await link.conn.execute(
                        "XCLAIM", link.stream, link.group, link.consumer, 0, *held, "JUSTID"
                    )
                if self.draining:
                    continue
                self._busy += 1
                try:
                    reply = await link.conn.execute(
                        "XAUTOCLAIM", link.stream, link.group, link.consumer, link.claim_idle_ms, "0-0",
                        "COUNT", 16,
                    )  # fmt: skip
                    if reply[1]:
                        await self._reclaimed(reply[1])
                finally:
                    self._busy -= 1
            except (OSError, RespError) as exc:
                link.broken(exc)
                log.warning("stage %d: reclaiming failed: %s", link.stage, exc)

    async def _reclaimed(self, items: list) -> None:
        link = self._link
        ids = [i for i, _f in items]
        pending = await link.conn.execute(
            "XPENDING", link.stream, link.group, ids[0], ids[-1], len(ids) + 64, link.consumer
        )
        deliveries = {p[0]: int(p[3]) for p in pending}
        retry = []
        for entry_id, fields in items:
            if fields is None:
                continue
            times = deliveries.get(entry_id, 1)
            entry = parse_entry(entry_id, fields, link.epoch)
            if entry.rid in link.held:
                continue
            if times > 1 + link.max_retries:
                await self._dead_letter(entry, times)
            else:
                log.info("stage %d: took over request %d (delivery %d)", link.stage, entry.rid, times)
                link.reclaimed += 1
                retry.append(entry)
        if retry:
            await self._accept(retry)

    async def _dead_letter(self, entry: Entry, times: int) -> None:
        link = self._link
        last, data = await link.conn.pipeline(
            [
                ("GET", link.keys.error(link.stage, entry.rid)),
                ("GET", entry.blob) if entry.blob else ("PING",),
            ]
        )
        why = (
            bytes(last).decode(errors="replace")
            if last
            else "the replicas holding it stopped without an answer"
        )
        frame = (
            entry.data if entry.data is not None else (data if isinstance(data, bytes | memoryview) else b"")
        )
        message = (
            f"stage {link.stage}: request {entry.rid} moved to the dead-letter stream {link.keys.dead} after "
            f"{times - 1} deliveries (max_retries={link.max_retries}); last error: {why}"
        )
        log.warning("%s", message)
        error = Frame(Kind.ERROR, entry.rid, error=ErrorInfo(link.stage, "compute", message))
        dead = [
            "MAXLEN", "~", str(link.dead_maxlen), "*",
            "rid", str(entry.rid), "stage", str(link.stage), "deliveries", str(times - 1),
            "error", why, "entry", entry.entry_id, "f", frame,
        ]  # fmt: skip
        reply = entry_args(entry.rid, entry.reply, None, frame=frame_chunks(error))
        await link.finish(entry, [(link.keys.dead, dead), (entry.reply, reply)])
        link.dead_lettered += 1

    async def receive(self) -> Received:
        assert self._wake is not None, "start() first"
        while True:
            while not self._ready:
                if self._closed:
                    raise ConnectionClosed("the Redis inbox is closed")
                self._wake.clear()
                await self._wake.wait()
            entry = self._ready.popleft()
            started = time.monotonic()
            try:
                assert entry.data is not None
                frame = decode(entry.data, self._link.max_frame_bytes)
            except ProtocolError as exc:
                with contextlib.suppress(OSError, RespError):
                    await self._answer(
                        entry, "protocol", f"stage {self._link.stage}: undecodable entry: {exc}"
                    )
                self._link.held.pop(entry.rid, None)
                continue
            entry.data = None  # the frame's tensors keep the buffer alive as long as they need it
            if entry.deadline_wall is not None:
                frame = dataclasses.replace(frame, budget_ms=(entry.deadline_wall - time.time()) * 1000.0)
            return Received(frame, started, time.monotonic())

    async def send_back(self, frame: Frame) -> None:
        """An ERROR for a held request: retried later if it may be transient, else answered now."""
        link = self._link
        entry = link.held.get(frame.request_id)
        if frame.kind is not Kind.ERROR or entry is None:
            log.debug("stage %d: dropped a %s frame going back", link.stage, frame.kind.name)
            return
        error = frame.error
        try:
            if error is not None and error.code in _RETRYABLE:
                del link.held[frame.request_id]  # no longer renewed: reclaimed after claim_idle_ms
                await link.conn.execute(
                    "SET", link.keys.error(link.stage, entry.rid), error.message, "PX", link.done_ttl_ms
                )
                log.info("stage %d: request %d failed, will be retried: %s", link.stage, entry.rid, error)
                return
            body = entry_args(entry.rid, entry.reply, None, frame=frame_chunks(frame))
            await link.finish(entry, [(entry.reply, body)])
            link.held.pop(frame.request_id, None)
        except (OSError, RespError) as exc:
            log.warning("stage %d: cannot report the error of request %d: %s", link.stage, entry.rid, exc)

    async def drain(self) -> None:
        """Stop taking entries; return once those held are handed on (or handed back after the timeout)."""
        link = self._link
        self.draining = True
        deadline = time.monotonic() + link.drain_timeout_s
        if self._busy and link.reader_id:  # a blocked read may still be handed entries: end it now
            with contextlib.suppress(OSError, RespError, asyncio.TimeoutError):
                await asyncio.wait_for(link.conn.execute("CLIENT", "UNBLOCK", link.reader_id), 1.0)
        while self._busy and time.monotonic() < deadline and not self._closed:
            await asyncio.sleep(0.005)  # what they got is held (and finished below) before this ends
        if link.held:
            log.info("stage %d: draining: finishing the %d request(s) held here", link.stage, len(link.held))
        while link.held and time.monotonic() < deadline and not self._closed:
            await asyncio.sleep(0.01)
        await self.hand_back()

    async def hand_back(self) -> None:
        """Make the entries still held here immediately claimable by the other replicas."""
        link = self._link
        ids = [e.entry_id for e in link.held.values()]
        if not ids:
            return
        log.info("stage %d: handing %d request(s) back to the other replicas", link.stage, len(ids))
        link.held.clear()
        self._ready.clear()
        with contextlib.suppress(OSError, RespError):
            await asyncio.wait_for(
                link.conn.execute(
                    "XCLAIM", link.stream, link.group, link.consumer, 0, *ids, "IDLE", 2 * link.claim_idle_ms,
                    "JUSTID",
                ),
                2.0,
            )  # fmt: skip

    def stop_handler(self, stop: Callable[[], None]) -> Callable[[], None]:
        """A signal handler: the first call drains then calls ``stop``; a second one hands back and stops."""
        state: dict[str, Any] = {}

        def handler() -> None:
            if "task" not in state:
                state["task"] = asyncio.get_running_loop().create_task(self._drain_then(stop))
            else:
                log.info("stage %d: second stop signal: not waiting for the drain", self._link.stage)
                self.draining = True
                state["task"].cancel()
                asyncio.get_running_loop().create_task(self._hand_back_then(stop))

        return handler

    async def _drain_then(self, stop: Callable[[], None]) -> None:
        await self.drain()
        stop()

    async def _hand_back_then(self, stop: Callable[[], None]) -> None:
        await self.hand_back()
        stop()

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._wake is not None:
            self._wake.set()  # the outbox closes the shared connection once its writes are done
