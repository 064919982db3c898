"""The Redis Streams transport: a stage's Inbox/Outbox over a broker (see ``docs/redis.md``).

Keys, for a deployment's ``prefix``: ``<prefix>:s<k>`` is stage k's input stream, read by the consumer
group ``stage<k>``; every replica of stage k is one consumer of that group (competing consumers). Entries
are described in :mod:`layerline.runtime.redis_entries` (small frames inline, large ones as blobs). The
last stage writes its result to the entry's reply stream; errors go there directly from any stage.

[Note: hand-off] A replica acknowledges an entry only in the same atomic step (one Lua script) that adds
its result to the next stream: ``SET <prefix>:done:<k>:<rid> NX`` → ``XADD`` next → ``XACK`` → ``XDEL``
(→ ``UNLINK`` of the entry's blob). A large result's blob is written by a ``SET`` sent in the same round
trip just before the script; a script that finds the hand-off already done deletes it again. A replica
that dies before the script leaves the entry pending; another replica takes it over with ``XAUTOCLAIM``
once it has been idle ``claim_idle_ms``. The ``done`` key makes the hand-off idempotent per (stage,
request): a duplicate delivery (a slow replica whose entry was reclaimed) is acknowledged without a second
write. While a replica holds entries (queued or computing) it renews them every ``claim_idle_ms / 4``
with ``XCLAIM … JUSTID`` (which resets the idle time without counting a delivery), so a long computation
is not taken over. A hand-off that fails because the connection broke is retried (it is idempotent)
until the entry's deadline.

The stage's side lives in three modules: this one holds :class:`RedisStageLink` (the connections to
the broker, the epoch, the hand-off script); :mod:`layerline.runtime.redis_inbox` holds
:class:`RedisInbox` (reading, take-over, retries, dead letters, draining) and
:mod:`layerline.runtime.redis_outbox` :class:`RedisOutbox` (writing results). All three classes are
importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from layerline.errors import TransportError
from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES
from layerline.runtime.redis_entries import (
    DEFAULT_BLOB_MIN_BYTES,
    FINISH_LUA,
    LEAVE_LUA,
    Entry,
    StreamKeys,
    ensure_group,
    frame_align,
    sync_epoch,
)
from layerline.runtime.redis_inbox import RedisInbox
from layerline.runtime.redis_outbox import RedisOutbox
from layerline.runtime.redis_resp import RespConnection, RespError

__all__ = ["RedisInbox", "RedisOutbox", "RedisStageLink"]

log = logging.getLogger(__name__)


class RedisStageLink:
    """Stage ``stage``'s connection to the broker; :attr:`inbox` and :attr:`outbox` share it.

    ``last``: this stage's results go to each entry's reply stream instead of stage ``stage + 1``.
    ``read_count``: entries fetched per XREADGROUP (and held ahead of the worker's own queue).
    ``blob_min_bytes``: results at least this large are written as blobs.
    """

    def __init__(
        self,
        url: str,
        stage: int,
        *,
        last: bool,
        prefix: str = "layerline",
        consumer: str = "",
        claim_idle_ms: int = 5000,
        max_retries: int = 3,
        block_ms: int = 1000,
        read_count: int = 2,
        done_ttl_s: float = 3600.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        dead_maxlen: int = 10000,
        blob_min_bytes: int = DEFAULT_BLOB_MIN_BYTES,
        drain_timeout_s: float = 20.0,
    ) -> None:
        if claim_idle_ms < 10 or max_retries < 0 or read_count < 1:
            raise ValueError(
                f"need claim_idle_ms >= 10, max_retries >= 0, read_count >= 1; got "
                f"{claim_idle_ms}, {max_retries}, {read_count}"
            )
        self.url = url
        self.stage = stage
        self.last = last
        self.keys = StreamKeys(prefix)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self.max_retries = max_retries
        self.block_ms = block_ms
        self.read_count = read_count
        self.done_ttl_ms = int(done_ttl_s * 1000)
        self.max_frame_bytes = max_frame_bytes
        self.dead_maxlen = dead_maxlen
        self.blob_min_bytes = blob_min_bytes
        self.drain_timeout_s = drain_timeout_s
        self.stream = self.keys.stage(stage)
        self.group = self.keys.group(stage)
        self.next_stream = None if last else self.keys.stage(stage + 1)
        self.conn = RespConnection(url, name=f"stage {stage}", on_connect=self._on_connect, align=frame_align)
        self.reader = RespConnection(  # its own connection: the blocking XREADGROUP holds it
            url, name=f"stage {stage} reader", on_connect=self._on_reader_connect, align=frame_align
        )
        self.reader_id = 0  # the reader connection's CLIENT ID (to unblock its read when draining)
        self.epoch = ""
        self.held: dict[int, Entry] = {}  # request id → entry this replica holds (queued or computing)
        self.inbox = RedisInbox(self)
        self.outbox = RedisOutbox(self)
        self.up = False
        self.last_error = "not started"
        self.reclaimed = 0
        self.dead_lettered = 0
        self.data_losses = 0
        self.heartbeat_s = min(1.0, max(0.01, claim_idle_ms / 4000.0))
        self.alive_ttl_ms = 3000

    async def _on_connect(self, run: Any) -> None:
        """On every new connection: notice a server that lost its data, make sure the group exists."""
        token, lost = await sync_epoch(run, self.keys, self.epoch)
        if lost:
            self.data_losses += 1
            log.warning(
                "stage %d: Redis at %s lost its data (restarted without persistence?); dropping the %d "
                "request(s) this replica held: their gateways report them failed",
                self.stage,
                self.url,
                len(self.held),
            )
            self.held.clear()
            self.inbox.forget()
        self.epoch = token
        await ensure_group(run, self.stream, self.group)

    async def _on_reader_connect(self, run: Any) -> None:
        await self._on_connect(run)
        self.reader_id = int(await run("CLIENT", "ID"))

    async def heartbeat(self) -> None:
        """Mark this consumer alive for ``alive_ttl_ms`` (Redis 7.0's XINFO idle does not move while idle)."""
        await self.conn.pipeline(
            [
                ("SADD", self.keys.consumers(self.stage), self.consumer),
                (
                    "SET",
                    self.keys.alive(self.stage, self.consumer),
                    str(os.getpid()),
                    "PX",
                    self.alive_ttl_ms,
                ),
            ]
        )

    async def open(self) -> None:
        if self.up:
            return
        try:
            await self.conn.execute("PING")
            await self.heartbeat()
        except (OSError, RespError) as exc:
            raise TransportError(f"stage {self.stage} cannot reach Redis at {self.url}: {exc}") from exc
        self.up, self.last_error = True, ""

    def broken(self, exc: BaseException) -> None:
        self.up, self.last_error = False, f"Redis at {self.url}: {exc}"

    async def finish(
        self,
        entry: Entry,
        destinations: list[tuple[str, list]],
        *,
        blob: str = "",
        before: tuple = (),
    ) -> int:
        """Atomically write ``destinations`` (once per stage and request) and acknowledge ``entry``.

        ``before``: a command sent in the same round trip just before (the ``SET`` of ``blob``).
        Returns 1 (written), 0 (a duplicate: already handed on) or -1 (the entry is from before a
        data loss: nothing written).
        """
        keys = [
            self.stream,
            self.keys.done(self.stage, entry.rid),
            self.keys.epoch,
            *(d for d, _ in destinations),
        ]
        args: list[Any] = [
            self.group,
            entry.entry_id,
            self.done_ttl_ms,
            entry.epoch or self.epoch,
            entry.blob or "",
            blob,
        ]
        for _, xadd in destinations:
            args += [len(xadd), *xadd]
        commands = [before] if before else []
        commands.append(("EVAL", FINISH_LUA, len(keys), *keys, *args))
        replies = await self.conn.pipeline(commands)
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
        return int(replies[-1])

    async def close(self) -> None:
        """Leave (no longer live; out of the group if nothing is pending here) and disconnect."""
        if self.up:
            keys = [self.stream, self.keys.consumers(self.stage), self.keys.alive(self.stage, self.consumer)]
            with contextlib.suppress(OSError, RespError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    self.conn.execute("EVAL", LEAVE_LUA, len(keys), *keys, self.group, self.consumer), 1.0
                )
        self.up = False
        self.conn.close()
        self.reader.close()
