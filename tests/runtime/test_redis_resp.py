"""The small RESP client of the Redis transport, against a real redis-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from redis_support import NEEDS_REDIS

from layerline.runtime.framing import Frame, Kind, decode
from layerline.runtime.launch import free_ports
from layerline.runtime.redis_entries import frame_align, frame_chunks
from layerline.runtime.redis_resp import (
    Chunks,
    RedisAddress,
    RespConnection,
    RespConnectionError,
    RespError,
    parse_url,
)
from layerline.runtime.redis_server import start_redis_server

pytestmark = NEEDS_REDIS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_redis_server(free_ports(1)[0], tmp_path_factory.mktemp("resp"))
    try:
        yield srv
    finally:
        srv.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30.0))


def test_parse_url():
    assert parse_url("redis://10.0.0.5:6380/2") == RedisAddress("10.0.0.5", 6380, 2)
    assert parse_url("redis://u:p%40ss@h") == RedisAddress("h", 6379, 0, "u", "p@ss")
    assert parse_url("redis://:secret@h:1") == RedisAddress("h", 1, 0, None, "secret")
    with pytest.raises(ValueError, match="only redis://"):
        parse_url("rediss://h:1")
    with pytest.raises(ValueError, match="must be numbers"):
        parse_url("redis://h:1/x")


def test_replies_of_every_type_and_pipelined_errors(server):
    async def go():
        conn = RespConnection(server.url)
        try:
            assert await conn.execute("PING") == "PONG"
            assert await conn.execute("SET", "k", "v") == "OK"
            assert await conn.execute("GET", "k") == b"v"
            assert await conn.execute("GET", "missing") is None
            assert await conn.execute("INCR", "n") == 1
            assert await conn.execute("XADD", "st", "1-1", "a", "1", "b", b"") == b"1-1"
            assert await conn.execute("XRANGE", "st", "-", "+") == [[b"1-1", [b"a", b"1", b"b", b""]]]
            assert await conn.execute("XRANGE", "st", "2", "+") == []
            with pytest.raises(RespError) as info:
                await conn.execute("XGROUP", "CREATE", "nostream", "g", "0")
            assert "no such key" in str(info.value) or info.value.code == "ERR"
            replies = await conn.pipeline([("INCR", "n"), ("LPUSH", "k", "x"), ("INCR", "n")])
            assert replies[0] == 2 and isinstance(replies[1], RespError) and replies[1].code == "WRONGTYPE"
            assert replies[2] == 3
        finally:
            conn.close()

    run(go())


def test_large_values_are_sent_and_received_whole_and_aligned(server):
    async def go():
        conn = RespConnection(server.url, align=frame_align)
        try:
            data = np.random.default_rng(1).integers(0, 255, 3_200_001, dtype=np.uint8)
            assert await conn.execute("SET", "big", data) == "OK"
            got = await conn.execute("GET", "big")
            assert isinstance(got, memoryview) and bytes(got) == data.tobytes()
            parts = Chunks([b"head", memoryview(data)[:100_000], b"", b"tail"])
            await conn.execute("SET", "parts", parts)
            assert bytes(await conn.execute("GET", "parts")) == bytes(parts)
            # a frame stored as one value: its payload lands on a 64-byte boundary, tensors are views
            x = np.arange(300_000, dtype=np.float32).reshape(1000, 300)
            frame = Frame(Kind.DATA, 7, {"name-with-some-length": x, "y": x[:3]})
            await conn.execute("SET", "frame", frame_chunks(frame))
            value = await conn.execute("GET", "frame")
            back = decode(value)
            np.testing.assert_array_equal(back.tensors["name-with-some-length"], x)
            assert back.tensors["name-with-some-length"].ctypes.data % 64 == 0
            assert not back.tensors["y"].flags.owndata
            # many large and small replies interleaved on one connection, from concurrent callers
            sizes = [10, 70_000, 5, 300_000, 65_536, 0]
            for i, n in enumerate(sizes):
                await conn.execute("SET", f"v{i}", data[:n])
            for _ in range(3):
                got = await asyncio.gather(
                    *(conn.execute("GET", f"v{i}") for i in range(len(sizes)) for _ in range(4))
                )
                assert [len(g) for g in got] == [n for n in sizes for _ in range(4)]
            items = await conn.execute("MGET", *(f"v{i}" for i in range(len(sizes))))
            assert [bytes(v) for v in items] == [data[:n].tobytes() for n in sizes]
        finally:
            conn.close()

    run(go())


def test_a_caller_that_gives_up_does_not_disturb_the_next(server):
    async def go():
        conn = RespConnection(server.url)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.execute("BLPOP", "nothing", 0.3), 0.05)
            assert await conn.execute("ECHO", "after") == b"after"  # its reply, not BLPOP's nil
        finally:
            conn.close()

    run(go())


def test_reconnects_after_a_restart_and_runs_on_connect_first(tmp_path):
    port = free_ports(1)[0]
    calls = []

    async def on_connect(command):
        calls.append(await command("INCR", "connects"))

    async def go(srv):
        conn = RespConnection(srv.url, on_connect=on_connect)
        try:
            assert await conn.execute("GET", "connects") == b"1"
            srv.stop()
            with pytest.raises(RespConnectionError):
                await conn.execute("PING")
            with pytest.raises(RespConnectionError, match="cannot connect"):
                await conn.execute("PING")
            srv2 = start_redis_server(port, tmp_path)
            try:
                assert await conn.execute("GET", "connects") == b"1"  # a new server: on_connect ran again
                assert conn.connections == 2
            finally:
                srv2.stop()
        finally:
            conn.close()
        with pytest.raises(RespConnectionError, match="closed"):
            await conn.execute("PING")

    run(go(start_redis_server(port, tmp_path)))
    assert calls == [1, 1]
