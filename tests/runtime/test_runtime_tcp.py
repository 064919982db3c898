"""Frames over real loopback sockets: framing across reads, reconnects, back-pressure, bad peers."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from runtime_models import run

from layerline.errors import ProtocolError, StageUnavailable
from layerline.runtime.connection import FrameConnection, listen_socket, open_connection
from layerline.runtime.framing import Frame, Kind, StageStatus, decode, encode
from layerline.runtime.launch import free_ports
from layerline.runtime.tcp import TcpInbox, TcpOutbox
from layerline.runtime.transport import ConnectionClosed, Inbox, Outbox


class Reader:
    """Collects what a started FrameConnection delivers, for ``await read()``."""

    def __init__(self, conn: FrameConnection) -> None:
        self.conn = conn
        self.frames: asyncio.Queue = asyncio.Queue()
        conn.start(self.frames.put_nowait, self.frames.put_nowait)  # a close reason ends the stream

    async def read(self):
        item = await asyncio.wait_for(self.frames.get(), 10)
        if isinstance(item, Exception):
            raise item
        return item

    async def write(self, frame: Frame) -> float:
        return await self.conn.write(frame)

    def close(self) -> None:
        self.conn.close()


async def connected_pair() -> tuple[Reader, Reader]:
    loop = asyncio.get_running_loop()
    lsock = listen_socket("127.0.0.1", 0)
    port = lsock.getsockname()[1]
    accept = asyncio.ensure_future(loop.sock_accept(lsock))
    client = await open_connection("127.0.0.1", port)
    sock, addr = await accept
    lsock.close()
    return Reader(client), Reader(FrameConnection(sock, f"{addr[0]}:{addr[1]}"))


def test_frames_of_mixed_sizes_arrive_intact_in_order_both_ways():
    sizes = [0, 1, 100, 4096, 70_000, 300_000, 3_200_000, 5, 0, 65_536, 1]

    async def main():
        a, b = await connected_pair()
        rng = np.random.default_rng(3)
        sent = [rng.standard_normal(n).astype(np.float32) for n in sizes]

        async def writer():
            for i, arr in enumerate(sent):
                await a.write(Frame(Kind.DATA, i, {"t": arr, "i": np.array(i)}))

        task = asyncio.create_task(writer())
        for i, arr in enumerate(sent):
            got = await b.read()
            assert got.frame.request_id == i
            np.testing.assert_array_equal(got.frame.tensors["t"], arr)
            assert got.finished >= got.started
        await task
        await b.write(Frame(Kind.ERROR, 77))  # and back the other way, on the same connection
        assert (await a.read()).frame.request_id == 77
        a.close()
        with pytest.raises(ConnectionClosed):
            await b.read()
        b.close()

    run(main())


def test_queued_writes_keep_their_order_and_a_cancelled_wait_does_not_cut_a_frame():
    async def main():
        a, b = await connected_pair()
        big = np.arange(4_000_000, dtype=np.float32)
        writes = [a.conn.send(Frame(Kind.DATA, i, {"t": big if i % 3 == 0 else big[:10]})) for i in range(9)]
        writes[0].cancel()  # the caller gave up waiting: the frame is still written whole
        assert a.conn.write_backlog > 0
        for i in range(9):
            got = await b.read()
            assert got.frame.request_id == i and got.frame.tensors["t"][-1] == (big[-1] if i % 3 == 0 else 9)
        for write in writes[1:]:
            assert await write >= 0
        assert a.conn.write_backlog == 0
        a.close()
        b.close()
        with pytest.raises(ConnectionClosed):
            await a.conn.send(Frame(Kind.DATA, 1))

    run(main())


def test_a_frame_dribbled_one_byte_at_a_time_is_reassembled():
    async def main():
        loop = asyncio.get_running_loop()
        lsock = listen_socket("127.0.0.1", 0)
        raw = socket.create_connection(lsock.getsockname())
        sock, _ = await loop.sock_accept(lsock)
        conn = Reader(FrameConnection(sock, "dribbler"))
        data = b"".join(bytes(p) for p in encode(Frame(Kind.DATA, 5, {"x": np.arange(10.0)}, budget_ms=50.0)))

        async def dribble():
            for i in range(len(data)):
                raw.send(data[i : i + 1])
                await asyncio.sleep(0 if i % 50 else 0.001)

        task = asyncio.create_task(dribble())
        got = await conn.read()
        await task
        np.testing.assert_array_equal(got.frame.tensors["x"], np.arange(10.0))
        assert got.frame.budget_ms == 50.0 and got.transfer_s > 0
        raw.close()
        conn.close()
        lsock.close()

    run(main())


def test_a_peer_that_closes_mid_frame_or_sends_garbage_or_too_much_is_rejected():
    async def main():
        loop = asyncio.get_running_loop()
        lsock = listen_socket("127.0.0.1", 0)
        small = b"".join(bytes(p) for p in encode(Frame(Kind.DATA, 1, {"x": np.zeros(100)})))
        frame = b"".join(bytes(p) for p in encode(Frame(Kind.DATA, 1, {"x": np.zeros(1000)})))
        cases = [
            (small[:-10], ConnectionClosed, "closed"),
            (b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", ProtocolError, "magic"),
            (frame, ProtocolError, "max_frame_bytes=4096"),
        ]
        for data, error, message in cases:
            raw = socket.create_connection(lsock.getsockname())
            sock, _ = await loop.sock_accept(lsock)
            conn = Reader(FrameConnection(sock, "peer", max_frame_bytes=4096))
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
            with pytest.raises(error, match=message):
                await conn.read()
            conn.close()
            raw.close()
        lsock.close()

    run(main())


def test_a_peer_sending_garbage_is_told_why_before_it_is_dropped():
    async def main():
        loop = asyncio.get_running_loop()
        inbox = TcpInbox("127.0.0.1", 0)
        await inbox.start()
        raw = socket.socket()
        raw.setblocking(False)
        await loop.sock_connect(raw, ("127.0.0.1", inbox.port))
        await loop.sock_sendall(raw, b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(raw, 65536), 5):
            data += chunk
        raw.close()
        await inbox.close()
        return decode(data)

    frame = run(main())
    assert frame.kind is Kind.ERROR and frame.error.code == "protocol"
    assert "bad frame magic" in frame.error.message


def test_outbox_reports_link_changes_and_reconnects_when_the_peer_comes_back():
    (port,) = free_ports(1)

    async def main():
        links: list[tuple[bool, str]] = []

        async def on_link(up: bool, detail: str) -> None:
            links.append((up, detail))

        async def on_backward(received) -> None:
            backward.append(received.frame)

        backward: list[Frame] = []
        hello = Frame(Kind.HELLO, 0, statuses=(StageStatus(3, True, "me"),))
        out = TcpOutbox("127.0.0.1", port, hello=hello, backoff_s=(0.01, 0.05))
        await out.start(on_backward, on_link)
        await asyncio.sleep(0.2)
        assert (
            not out.connected
            and links == [(False, links[0][1])]
            and "Connection refused" in links[0][1]
            and str(port) in links[0][1]
        )
        with pytest.raises(StageUnavailable, match=f"127.0.0.1:{port}"):
            await out.send(Frame(Kind.DATA, 1))

        for round_ in range(2):  # the peer comes, goes and comes back
            inbox = TcpInbox("127.0.0.1", port)
            await inbox.start()
            assert await out.wait_connected(5.0)
            assert (await inbox.receive()).frame.statuses[0].detail == "me"  # HELLO first
            await out.send(Frame(Kind.DATA, 10 + round_, {"a": np.ones(3)}))
            assert (await inbox.receive()).frame.request_id == 10 + round_
            await inbox.send_back(Frame(Kind.ERROR, 10 + round_))
            for _ in range(100):
                if len(backward) > round_:
                    break
                await asyncio.sleep(0.01)
            assert backward[round_].request_id == 10 + round_
            await inbox.close()
            for _ in range(200):
                if not out.connected:
                    break
                await asyncio.sleep(0.01)
            assert not out.connected
        await out.close()
        assert [up for up, _ in links] == [False, True, False, True, False]

    run(main())


def test_a_full_inbox_stops_reading_and_pushes_back_on_the_sender():
    async def main():
        inbox = TcpInbox("127.0.0.1", 0, queue_size=1)
        await inbox.start()
        conn = Reader(await open_connection("127.0.0.1", inbox.port))
        big = np.zeros(1 << 20, np.float32)  # 4 MB frames
        sent = 0

        async def sender():
            nonlocal sent
            for i in range(40):
                await conn.write(Frame(Kind.DATA, i, {"t": big}))
                sent += 1

        task = asyncio.create_task(sender())
        await asyncio.sleep(0.5)
        blocked_at = sent
        assert blocked_at < 40, "160 MB were accepted without anybody reading: no back-pressure"
        for i in range(40):
            assert (await asyncio.wait_for(inbox.receive(), 10)).frame.request_id == i
        await asyncio.wait_for(task, 10)
        assert sent == 40
        conn.close()
        await inbox.close()
        with pytest.raises(ConnectionClosed):
            await inbox.receive()

    run(main())


def test_the_tcp_transport_implements_the_stage_interface():
    assert isinstance(TcpInbox("127.0.0.1", 0), Inbox)
    assert isinstance(TcpOutbox("127.0.0.1", 9), Outbox)
