"""The hand-off of the Redis transport in one process: duplicates, blobs, missing blobs, stale epochs.

Two :class:`RedisStageLink` replicas of one stage against a real redis-server; the stage's work is
done by the test (no onnxruntime), so every interleaving is forced, not hoped for.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from redis_support import NEEDS_REDIS

from layerline.runtime.framing import Frame, Kind, decode
from layerline.runtime.launch import free_ports
from layerline.runtime.redis_entries import StreamKeys, entry_args, frame_chunks
from layerline.runtime.redis_resp import RespConnection
from layerline.runtime.redis_server import start_redis_server
from layerline.runtime.redis_transport import RedisStageLink

pytestmark = NEEDS_REDIS


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    srv = start_redis_server(free_ports(1)[0], tmp_path_factory.mktemp("handoff"))
    try:
        yield srv.url
    finally:
        srv.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30.0))


async def _put(
    conn: RespConnection, keys: StreamKeys, rid: int, frame: Frame, *, blob: bool, dl: float
) -> str:
    """Add ``frame`` to stage 1's stream as the stage before would (blob or inline)."""
    chunks = frame_chunks(frame)
    if blob:
        key = keys.blob("1", rid)
        await conn.execute("SET", key, chunks)
        body = entry_args(rid, keys.reply(1), dl, blob=key)
    else:
        key, body = "", entry_args(rid, keys.reply(1), dl, frame=chunks)
    await conn.execute("XADD", keys.stage(1), *body)
    return key


async def _received(link: RedisStageLink, timeout_s: float = 5.0) -> Frame:
    return (await asyncio.wait_for(link.inbox.receive(), timeout_s)).frame


@pytest.mark.parametrize("blob", [True, False], ids=["blob", "inline"])
def test_a_duplicate_hand_off_writes_once_and_leaves_no_blob(url, blob):
    prefix = f"dup-{blob}"
    keys = StreamKeys(prefix)
    blob_min = 0 if blob else 1 << 40
    # a slow replica (renews its entries only every second) and a fast one (takes over after 100 ms idle)
    slow = RedisStageLink(url, 1, last=False, prefix=prefix, consumer="slow", claim_idle_ms=60_000,
                          blob_min_bytes=blob_min)  # fmt: skip
    fast = RedisStageLink(url, 1, last=False, prefix=prefix, consumer="fast", claim_idle_ms=100,
                          blob_min_bytes=blob_min)  # fmt: skip

    async def go():
        conn = RespConnection(url)
        try:
            await slow.inbox.start()
            x = np.arange(50_000, dtype=np.float32)
            source_blob = await _put(
                conn, keys, 42, Frame(Kind.DATA, 42, {"x": x}), blob=blob, dl=time.time() + 30
            )
            got = await _received(slow)
            np.testing.assert_array_equal(got.tensors["x"], x)
            await fast.inbox.start()  # starts after the slow one holds the entry: it can only take it over
            again = await _received(fast)
            np.testing.assert_array_equal(again.tensors["x"], x)
            assert fast.reclaimed == 1
            out = Frame(Kind.DATA, 42, {"y": x * 2})
            await asyncio.wait_for(fast.outbox.send(out), 5.0)  # the first hand-off writes
            await asyncio.wait_for(slow.outbox.send(out), 5.0)  # the duplicate only acknowledges
            entries = await conn.execute("XRANGE", keys.stage(2), "-", "+")
            assert len(entries) == 1
            fields = dict(zip(entries[0][1][::2], entries[0][1][1::2], strict=True))
            data = await conn.execute("GET", fields[b"b"]) if blob else fields[b"f"]
            np.testing.assert_array_equal(decode(data).tensors["y"], x * 2)
            assert await conn.execute("XLEN", keys.stage(1)) == 0
            assert (await conn.execute("XPENDING", keys.stage(1), keys.group(1)))[0] == 0
            assert await conn.execute("EXISTS", keys.done(1, 42)) == 1
            blobs = sorted(k.decode() for k in await conn.execute("KEYS", f"{prefix}:b:*"))
            assert blobs == (
                [fields[b"b"].decode()] if blob else []
            )  # the loser's blob and the input's: gone
            assert not blob or source_blob not in blobs
            assert not slow.held and not fast.held
        finally:
            for link in (slow, fast):
                await link.inbox.close()
                await link.outbox.close()
            conn.close()

    run(go())


def test_entries_whose_blob_is_gone_are_settled_not_computed(url):
    keys = StreamKeys("gone")
    link = RedisStageLink(url, 1, last=False, prefix="gone", consumer="c", claim_idle_ms=5000)

    async def go():
        conn = RespConnection(url)
        try:
            await link.inbox.start()
            now = time.time()
            # 1: already handed on (its blob deleted by that hand-off): only acknowledged
            await conn.execute("SET", keys.done(1, 1), "1")
            await conn.execute(
                "XADD", keys.stage(1), *entry_args(1, keys.reply(1), now + 30, blob="gone:b:x1")
            )
            # 2: deadline passed: answered "deadline"; 3: lost for another reason: answered with an error
            await conn.execute(
                "XADD", keys.stage(1), *entry_args(2, keys.reply(1), now - 1, blob="gone:b:x2")
            )
            await conn.execute(
                "XADD", keys.stage(1), *entry_args(3, keys.reply(1), now + 30, blob="gone:b:x3")
            )
            # 4: a good one behind them is served
            await _put(
                conn, keys, 4, Frame(Kind.DATA, 4, {"x": np.ones(3, np.float32)}), blob=True, dl=now + 30
            )
            assert (await _received(link)).request_id == 4
            answers = {}
            for _id, fields in (await conn.execute("XRANGE", keys.reply(1), "-", "+")) or []:
                frame = decode(dict(zip(fields[::2], fields[1::2], strict=True))[b"f"])
                answers[frame.request_id] = frame.error
            assert set(answers) == {2, 3}
            assert answers[2].code == "deadline" and "passed while it was queued" in answers[2].message
            assert answers[3].code == "protocol" and "gone from Redis" in answers[3].message
            assert await conn.execute("XLEN", keys.stage(1)) == 1  # only 4, held here
            assert set(link.held) == {4}
        finally:
            await link.inbox.close()
            await link.outbox.close()
            conn.close()

    run(go())


def test_after_a_data_loss_a_replica_drops_what_it_held_and_writes_nothing_stale(url):
    keys = StreamKeys("epoch")
    link = RedisStageLink(url, 1, last=False, prefix="epoch", consumer="c", claim_idle_ms=5000)

    async def go():
        conn = RespConnection(url)
        try:
            await link.inbox.start()
            await _put(
                conn,
                keys,
                9,
                Frame(Kind.DATA, 9, {"x": np.ones(3, np.float32)}),
                blob=False,
                dl=time.time() + 30,
            )
            frame = await _received(link)
            entry = link.held[9]
            await conn.execute("SET", keys.epoch, "another-server")  # as after a restart without persistence
            link.conn.disconnect("test")  # the next command reconnects and notices
            await asyncio.wait_for(link.outbox.send(Frame(Kind.DATA, 9, dict(frame.tensors))), 5.0)
            assert link.data_losses == 1 and not link.held and link.epoch == "another-server"
            assert await conn.execute("XLEN", keys.stage(2)) == 0  # nothing written
            assert await link.finish(entry, []) == -1  # the script itself refuses an older epoch
        finally:
            await link.inbox.close()
            await link.outbox.close()
            conn.close()

    run(go())
