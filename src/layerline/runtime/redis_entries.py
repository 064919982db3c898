"""What the Redis transport stores: key names, stream entries, blobs, the hand-off script, the epoch.

An entry of a stage stream (or of a gateway's reply stream) has the fields ``rid`` (request id),
``reply`` (the gateway's reply stream), ``dl`` (absolute deadline, Unix seconds; optional) and either
``f`` (the frame, in the binary format of :mod:`layerline.runtime.framing`) or ``b`` (the name of a
string key holding that frame: a *blob*).

[Note: blobs for large frames] Measured on the 2-core VM (redis-server 7.0.15, our own client, one
XADD/SET and one XREADGROUP/GET of the size): the server copies a stream entry's value into the
stream's listpack (3.2 MB: XADD 2.7 ms) but keeps a large SET value as the very buffer it read it
into (0.67 ms); and the hand-off script copies every argument once more (3.2 MB: 4.7 ms through
Lua). A frame of ``blob_min_bytes`` or more therefore travels as a blob, written with ``SET … PX`` in
the same round trip as the (small) hand-off script, and fetched with ``GET`` by the reader. A blob is
deleted (``UNLINK``) by the hand-off that consumes its entry, or by the gateway's ``GETDEL``; its TTL
only cleans up after a writer that died between the two commands. The TTL outlasts the entry's
deadline by ``BLOB_SLACK_S``: after the deadline nothing reads it (a stage answers ``deadline``
without it).

[Note: epoch] ``<prefix>:epoch`` holds a random token set by the first client. A client that
reconnects compares it with the token it knows: different or missing means the server lost its data
(restarted without persistence), so what the client held is gone. The hand-off script refuses to
write for an older epoch, so a result computed before such a restart never lands in the new data.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES, MAGIC, PREFIX_SIZE, Frame, encode
from layerline.runtime.redis_resp import Chunks, RespError

__all__ = [
    "BLOB_SLACK_S",
    "DEFAULT_BLOB_MIN_BYTES",
    "FINISH_LUA",
    "GATEWAY_ID_LUA",
    "LEAVE_LUA",
    "SUBMIT_LUA",
    "Entry",
    "StreamKeys",
    "blob_ttl_ms",
    "ensure_group",
    "entry_args",
    "frame_align",
    "frame_chunks",
    "parse_entry",
    "sync_epoch",
]

#: Frames at least this large travel as blobs (see the module note; bench/bench_redis_hop.py).
DEFAULT_BLOB_MIN_BYTES = 96 * 1024
#: A blob outlives its entry's deadline by this much.
BLOB_SLACK_S = 60.0

Run = Callable[..., Awaitable[Any]]

#: KEYS: source stream, done key, epoch key, destination streams…; ARGV: group, source entry id ('' for
#: none), done TTL (ms), epoch token, source blob ('' for none), blob written for this hand-off ('' for
#: none), then per destination the number of XADD arguments and those arguments.
#: Returns 1 when it wrote, 0 for a duplicate (already handed on), -1 for a stale epoch (nothing done).
FINISH_LUA = """
if redis.call('GET', KEYS[3]) ~= ARGV[4] then
  if ARGV[6] ~= '' then redis.call('DEL', ARGV[6]) end
  return -1
end
local written = 0
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  local a = 7
  for k = 4, #KEYS do
    local n = tonumber(ARGV[a])
    redis.call('XADD', KEYS[k], unpack(ARGV, a + 1, a + n))
    a = a + n + 1
  end
  written = 1
elseif ARGV[6] ~= '' then
  redis.call('DEL', ARGV[6])
end
if ARGV[2] ~= '' then
  redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.pcall('XDEL', KEYS[1], ARGV[2])
end
if ARGV[5] ~= '' then redis.call('UNLINK', ARGV[5]) end
return written
"""


#: The gateway adds a request only to the data it knows: KEYS: epoch key, stream; ARGV: epoch token, then
#: the XADD arguments. Returns -1 (nothing added) when the server's epoch is another one.
SUBMIT_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('XADD', KEYS[2], unpack(ARGV, 2))
return 1
"""

#: After a data loss, a gateway keeps its number: KEYS: the gateway counter; ARGV: the gateway's number.
#: Raises the counter to at least that number, so that gateways starting later get other numbers.
GATEWAY_ID_LUA = """
if (tonumber(redis.call('GET', KEYS[1]) or '0') or 0) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""


#: A replica that stops: KEYS: its stream, the stage's consumer set, its alive key; ARGV: group, consumer.
#: It stops counting as live at once; it leaves the group only when it holds nothing (deleting a consumer
#: drops its pending entries, which would then never be taken over).
LEAVE_LUA = """
redis.call('DEL', KEYS[3])
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"""


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

    def blob(self, target: str, rid: int) -> str:
        """A new, unique blob key for request ``rid`` going to ``target`` (a stage number or ``r``)."""
        return f"{self.prefix}:b:{target}:{rid}:{os.urandom(6).hex()}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def gateways(self) -> str:
        return f"{self.prefix}:gateways"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    def reply(self, gateway: int) -> str:
        return f"{self.prefix}:reply:{gateway}"


@dataclass(eq=False)
class Entry:
    """One stream entry as read: its frame bytes (``data``) or, until fetched, its blob key."""

    entry_id: str
    rid: int
    reply: str
    deadline_wall: float | None
    data: bytes | memoryview | None
    blob: str | None = None
    epoch: str = ""

    @property
    def expired(self) -> bool:
        return self.deadline_wall is not None and self.deadline_wall <= time.time()


def parse_entry(entry_id: bytes, fields: list | None, epoch: str = "") -> Entry:
    """An entry from its id and flat field list (as XREADGROUP/XAUTOCLAIM return them)."""
    values = dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {}
    dl = values.get(b"dl")
    blob = values.get(b"b")
    return Entry(
        entry_id.decode(),
        int(values.get(b"rid", b"0")),
        bytes(values.get(b"reply", b"")).decode(),
        None if dl is None else float(dl),
        values.get(b"f"),
        None if blob is None else bytes(blob).decode(),
        epoch,
    )


def frame_chunks(frame: Frame, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Chunks:
    """The encoded frame as one bulk value (its tensor buffers are referenced, not copied)."""
    return Chunks(encode(frame, max_frame_bytes, budget_ms=None))


def frame_align(head: bytes) -> int:
    """Where a frame's payload starts in a bulk value beginning with ``head`` (0 if it is no frame)."""
    if len(head) >= PREFIX_SIZE and head[:4] == MAGIC:
        return PREFIX_SIZE + struct.unpack_from("<I", head, 16)[0]
    return 0


def blob_ttl_ms(deadline_wall: float | None, default_ms: int) -> int:
    """How long a blob for an entry with this deadline lives (``default_ms`` without a deadline)."""
    if deadline_wall is None:
        return default_ms
    return max(1000, min(default_ms, int((deadline_wall - time.time() + BLOB_SLACK_S) * 1000)))


def entry_args(
    rid: int, reply: str, deadline_wall: float | None, *, frame: Chunks | None = None, blob: str = ""
) -> list[Any]:
    """XADD arguments (``*`` then field/value pairs) of an entry carrying ``frame`` inline or ``blob``."""
    args: list[Any] = ["*", "rid", str(rid), "reply", reply]
    if deadline_wall is not None:
        args += ["dl", repr(deadline_wall)]
    if blob:
        args += ["b", blob]
    else:
        assert frame is not None
        args += ["f", frame]
    return args


async def ensure_group(run: Run, stream: str, group: str) -> bool:
    """Create ``group`` on ``stream`` (and the stream) reading from the start; False if it existed."""
    try:
        await run("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
    except RespError as exc:
        if exc.code != "BUSYGROUP":
            raise
        return False
    return True


async def sync_epoch(run: Run, keys: StreamKeys, known: str) -> tuple[str, bool]:
    """The server's epoch token (set now if missing) and whether it differs from ``known`` (if any)."""
    await run("SET", keys.epoch, os.urandom(8).hex(), "NX")
    current = await run("GET", keys.epoch)
    token = bytes(current or b"").decode()
    return token, bool(known) and token != known
