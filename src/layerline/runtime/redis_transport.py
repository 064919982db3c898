"""The Redis Streams transport: a stage's Inbox/Outbox over a broker (see ``docs/redis.md``).

Keys, for a deployment's ``prefix``: ``<prefix>:s<k>`` is stage k's input stream, read by the consumer
group ``stage<k>``; every replica of stage k is one consumer of that group (competing consumers). Each
entry holds one encoded frame (``f``, the bytes of :mod:`layerline.runtime.framing`), the request id
(``rid``), the gateway's reply stream (``reply``) and the absolute deadline (``dl``, Unix seconds).
The last stage writes its result to the entry's reply stream; errors go there directly from any stage.

[Note: hand-off] A replica acknowledges an entry only in the same atomic step (one Lua script) that adds
its result to the next stream: ``SET <prefix>:done:<k>:<rid> NX`` → ``XADD`` next → ``XACK`` → ``XDEL``.
A replica that dies before that step leaves the entry pending; another replica takes it over with
``XAUTOCLAIM`` once it has been idle ``claim_idle_ms``. The ``done`` key makes the hand-off idempotent
per (stage, request): a duplicate delivery (a slow replica whose entry was reclaimed) is acknowledged
without a second write. While a replica holds entries (queued or computing) it renews them every
``claim_idle_ms / 4`` with ``XCLAIM … JUSTID`` (which resets the idle time without counting a delivery),
so a long computation is not taken over.

[Note: retries] A failure that may be transient (onnxruntime error, broker write failed) leaves the entry
pending and records the error in ``<prefix>:err:<k>:<rid>``; it is retried when reclaimed. An entry
delivered more than ``1 + max_retries`` times is moved to ``<prefix>:dead`` with the last error, and the
gateway gets an ERROR (code ``compute``). Failures that cannot improve (bad request, deadline) are
answered at once. The ``redis`` package is imported only by this module and ``redis_pipeline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from layerline.errors import StageUnavailable, TransportError
from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES, ErrorInfo, Frame, Kind, decode, encode
from layerline.runtime.transport import (
    BackwardHandler,
    ConnectionClosed,
    LinkHandler,
    Received,
    UpstreamHandler,
)

__all__ = [
    "RedisStageLink",
    "StreamKeys",
    "connect",
    "encode_entry",
    "ensure_group",
    "finish_script",
]

log = logging.getLogger(__name__)

#: KEYS: source stream, done key, destination streams…; ARGV: group, entry id, done TTL (ms), then for
#: each destination the number of XADD arguments followed by them. Returns 1 when it wrote, else 0.
_FINISH_LUA = """
local written = 0
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  local a = 4
  for k = 3, #KEYS do
    local n = tonumber(ARGV[a])
    redis.call('XADD', KEYS[k], unpack(ARGV, a + 1, a + n))
    a = a + n + 1
  end
  written = 1
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
end
return written
"""

_RETRYABLE = frozenset({"compute", "unavailable"})


@dataclass(frozen=True)
class StreamKeys:
    """The key names of one deployment (``prefix``)."""

    prefix: str = "layerline"

    def stage(self, k: int) -> str:
        return f"{self.prefix}:s{k}"

    def group(self, k: int) -> str:
        return f"stage{k}"

    def done(self, k: int, rid: int) -> str:
        return f"{self.prefix}:done:{k}:{rid}"

    def error(self, k: int, rid: int) -> str:
        return f"{self.prefix}:err:{k}:{rid}"

    def consumers(self, k: int) -> str:
        """The set of consumer names that ever served stage k."""
        return f"{self.prefix}:consumers:{k}"

    def alive(self, k: int, consumer: str) -> str:
        """Exists (with a TTL) while that consumer's process is alive."""
        return f"{self.prefix}:alive:{k}:{consumer}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def gateways(self) -> str:
        return f"{self.prefix}:gateways"

    def reply(self, gateway: int) -> str:
        return f"{self.prefix}:reply:{gateway}"


def connect(url: str, max_connections: int = 8) -> aioredis.Redis:
    """An asyncio client over at most ``max_connections`` (more concurrent commands wait for one).

    No socket timeout: a blocking read must not be cut and silently re-issued (redis-py's default).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, socket_timeout=None, socket_connect_timeout=5.0
    )
    return aioredis.Redis(connection_pool=pool)


def finish_script(client: aioredis.Redis) -> Any:
    return client.register_script(_FINISH_LUA)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) reading from the start; no-op if it exists."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def encode_entry(
    frame: Frame, reply: str, deadline_wall: float | None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> list[bytes | str]:
    """The XADD arguments (``*`` and field/value pairs) of one entry carrying ``frame``."""
    data = b"".join(encode(frame, max_frame_bytes, budget_ms=None))
    args: list[bytes | str] = ["*", "f", data, "rid", str(frame.request_id), "reply", reply]
    if deadline_wall is not None:
        args += ["dl", repr(deadline_wall)]
    return args


@dataclass(eq=False)
class _Entry:
    entry_id: str
    rid: int
    reply: str
    deadline_wall: float | None
    data: bytes


def _parse_entry(entry_id: Any, fields: dict) -> _Entry:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    dl = fields.get(b"dl")
    return _Entry(
        eid,
        int(fields.get(b"rid", b"0")),
        fields.get(b"reply", b"").decode(),
        None if dl is None else float(dl),
        fields.get(b"f", b""),
    )


class RedisStageLink:
    """Stage ``stage``'s connection to the broker; :attr:`inbox` and :attr:`outbox` share it.

    ``last``: this stage's results go to each entry's reply stream instead of stage ``stage + 1``.
    ``read_count``: entries fetched per XREADGROUP (and held ahead of the worker's own queue).
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
        self.stream = self.keys.stage(stage)
        self.group = self.keys.group(stage)
        self.next_stream = None if last else self.keys.stage(stage + 1)
        self.client: aioredis.Redis | None = None
        self._finish: Any = None
        self.held: dict[int, _Entry] = {}  # request id → entry this replica holds (queued or computing)
        self.inbox = RedisInbox(self)
        self.outbox = RedisOutbox(self)
        self.up = False
        self.last_error = "not started"
        self.reclaimed = 0
        self.dead_lettered = 0
        self.heartbeat_s = min(1.0, max(0.01, claim_idle_ms / 4000.0))
        self.alive_ttl_ms = 3000

    async def heartbeat(self) -> None:
        """Mark this consumer alive for ``alive_ttl_ms`` (Redis 7.0's XINFO idle does not move while idle)."""
        assert self.client is not None
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(self.keys.consumers(self.stage), self.consumer)
            pipe.set(self.keys.alive(self.stage, self.consumer), str(os.getpid()), px=self.alive_ttl_ms)
            await pipe.execute()

    async def open(self) -> None:
        if self.client is not None:
            return
        self.client = connect(self.url)
        try:
            await ensure_group(self.client, self.stream, self.group)
        except (RedisError, OSError) as exc:
            await self.client.aclose()
            self.client = None
            raise TransportError(f"stage {self.stage} cannot reach Redis at {self.url}: {exc}") from exc
        self._finish = finish_script(self.client)
        await self.heartbeat()
        self.up, self.last_error = True, ""

    async def finish(self, entry: _Entry, destinations: list[tuple[str, list]]) -> bool:
        """Atomically write ``destinations`` (once per stage and request) and acknowledge ``entry``."""
        assert self.client is not None
        keys = [self.stream, self.keys.done(self.stage, entry.rid), *(d for d, _ in destinations)]
        args: list[Any] = [self.group, entry.entry_id, self.done_ttl_ms]
        for _, xadd in destinations:
            args += [len(xadd), *xadd]
        return bool(await self._finish(keys=keys, args=args))

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


class RedisInbox:
    """Entries of stage k's stream for this consumer: new ones (XREADGROUP) and reclaimed ones."""

    def __init__(self, link: RedisStageLink) -> None:
        self._link = link
        self._ready: deque[_Entry] = deque()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    async def start(self, on_upstream: UpstreamHandler | None = None) -> None:
        await self._link.open()
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="redis-read"),
            asyncio.create_task(self._claim_loop(), name="redis-claim"),
        ]

    def _push(self, entries: list[tuple[Any, dict]]) -> None:
        link = self._link
        for entry_id, fields in entries:
            if fields is None:  # deleted meanwhile
                continue
            entry = _parse_entry(entry_id, fields)
            held = link.held.get(entry.rid)
            if held is not None:
                if held.entry_id != entry.entry_id:
                    log.warning("request %d: a second entry %s while holding %s", entry.rid, entry_id, held)
                continue  # already queued or computing here
            link.held[entry.rid] = entry
            self._ready.append(entry)
        assert self._wake is not None
        self._wake.set()

    async def _read_loop(self) -> None:
        link = self._link
        assert link.client is not None
        while not self._closed:
            if len(self._ready) >= link.read_count:  # the worker is not taking: stop reading
                await asyncio.sleep(0.005)
                continue
            try:
                reply = await link.client.xreadgroup(
                    link.group,
                    link.consumer,
                    {link.stream: ">"},
                    count=link.read_count,
                    block=link.block_ms,
                )
                link.up, link.last_error = True, ""
            except (RedisError, OSError) as exc:
                link.up, link.last_error = False, f"Redis at {link.url}: {exc}"
                log.warning("stage %d: reading %s failed: %s", link.stage, link.stream, exc)
                await asyncio.sleep(0.5)
                if "NOGROUP" in str(exc):  # a restarted server without persistence: start afresh
                    with contextlib.suppress(RedisError, OSError):
                        await ensure_group(link.client, link.stream, link.group)
                continue
            for _stream, entries in reply or []:
                self._push(entries)

    async def _claim_loop(self) -> None:
        """Renew the entries held here; take over those idle too long elsewhere; dead-letter poison."""
        link = self._link
        assert link.client is not None
        while not self._closed:
            await asyncio.sleep(link.heartbeat_s)
            try:
                await link.heartbeat()
                held = [e.entry_id for e in link.held.values()]
                if held:
                    await link.client.xclaim(link.stream, link.group, link.consumer, 0, held, justid=True)
                _next, entries, *_ = await link.client.xautoclaim(
                    link.stream, link.group, link.consumer, link.claim_idle_ms, "0-0", count=16
                )
                if entries:
                    await self._reclaimed(entries)
            except (RedisError, OSError) as exc:
                link.up, link.last_error = False, f"Redis at {link.url}: {exc}"
                log.warning("stage %d: reclaiming failed: %s", link.stage, exc)

    async def _reclaimed(self, entries: list[tuple[Any, dict]]) -> None:
        link = self._link
        assert link.client is not None
        ids = [e[0] for e in entries]
        pending = await link.client.xpending_range(
            link.stream, link.group, min=ids[0], max=ids[-1], count=len(ids) + 64, consumername=link.consumer
        )
        deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        retry = []
        for entry_id, fields in entries:
            if fields is None:
                continue
            times = deliveries.get(entry_id, 1)
            entry = _parse_entry(entry_id, fields)
            if entry.rid in link.held:
                continue
            if times > 1 + link.max_retries:
                await self._dead_letter(entry, times)
            else:
                log.info("stage %d: took over request %d (delivery %d)", link.stage, entry.rid, times)
                link.reclaimed += 1
                retry.append((entry_id, fields))
        if retry:
            self._push(retry)

    async def _dead_letter(self, entry: _Entry, times: int) -> None:
        link = self._link
        assert link.client is not None
        last = await link.client.get(link.keys.error(link.stage, entry.rid))
        why = last.decode(errors="replace") if last else "the replicas holding it stopped without an answer"
        message = (
            f"stage {link.stage}: request {entry.rid} moved to the dead-letter stream {link.keys.dead} after "
            f"{times - 1} deliveries (max_retries={link.max_retries}); last error: {why}"
        )
        log.warning("%s", message)
        error = Frame(Kind.ERROR, entry.rid, error=ErrorInfo(link.stage, "compute", message))
        dead = [
            "MAXLEN", "~", str(link.dead_maxlen), "*",
            "rid", str(entry.rid), "stage", str(link.stage), "deliveries", str(times - 1),
            "error", why, "entry", entry.entry_id, "f", entry.data,
        ]  # fmt: skip
        reply = encode_entry(error, entry.reply, None)
        await link.finish(entry, [(link.keys.dead, dead), (entry.reply, reply)])
        link.dead_lettered += 1

    async def receive(self) -> Received:
        assert self._wake is not None, "start() first"
        while not self._ready:
            if self._closed:
                raise ConnectionClosed("the Redis inbox is closed")
            self._wake.clear()
            await self._wake.wait()
        entry = self._ready.popleft()
        started = time.monotonic()
        frame = decode(entry.data, self._link.max_frame_bytes)
        if entry.deadline_wall is not None:
            frame = dataclasses.replace(frame, budget_ms=(entry.deadline_wall - time.time()) * 1000.0)
        return Received(frame, started, time.monotonic())

    async def send_back(self, frame: Frame) -> None:
        """An ERROR for a held request: retried later if it may be transient, else answered now."""
        link = self._link
        entry = link.held.get(frame.request_id)
        if frame.kind is not Kind.ERROR or entry is None or link.client is None:
            log.debug("stage %d: dropped a %s frame going back", link.stage, frame.kind.name)
            return
        error = frame.error
        try:
            if error is not None and error.code in _RETRYABLE:
                del link.held[frame.request_id]  # no longer renewed: reclaimed after claim_idle_ms
                await link.client.set(
                    link.keys.error(link.stage, entry.rid), error.message, px=link.done_ttl_ms
                )
                log.info("stage %d: request %d failed, will be retried: %s", link.stage, entry.rid, error)
                return
            await link.finish(entry, [(entry.reply, encode_entry(frame, entry.reply, None))])
            link.held.pop(frame.request_id, None)
        except (RedisError, OSError) as exc:
            log.warning("stage %d: cannot report the error of request %d: %s", link.stage, entry.rid, exc)

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._wake is not None:
            self._wake.set()  # the outbox closes the shared connection once its writes are done


class RedisOutbox:
    """Writes each result to the next stage's stream (or the reply stream) and acknowledges its entry."""

    def __init__(self, link: RedisStageLink) -> None:
        self._link = link
        self._tasks: set[asyncio.Task] = set()

    @property
    def connected(self) -> bool:
        return self._link.up and self._link.client is not None

    @property
    def peer(self) -> str:
        return self._link.next_stream or "the gateway's reply stream"

    @property
    def last_error(self) -> str:
        return self._link.last_error

    async def start(self, on_backward: BackwardHandler, on_link: LinkHandler) -> None:
        await self._link.open()

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

    async def _write(self, frame: Frame, entry: _Entry, fut: asyncio.Future) -> None:
        link = self._link
        t0 = time.monotonic()
        try:
            dest = entry.reply if link.next_stream is None else link.next_stream
            xadd = encode_entry(frame, entry.reply, entry.deadline_wall, link.max_frame_bytes)
            if not await link.finish(entry, [(dest, xadd)]):
                log.info("stage %d: request %d was already handed on (duplicate)", link.stage, entry.rid)
            link.held.pop(frame.request_id, None)
        except (RedisError, OSError) as exc:
            link.up, link.last_error = False, f"Redis at {link.url}: {exc}"
            if not fut.done():
                fut.set_exception(StageUnavailable(f"stage {link.stage} cannot write to Redis: {exc}"))
            return
        except Exception as exc:  # ProtocolError from encode
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(time.monotonic() - t0)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._link.close()
