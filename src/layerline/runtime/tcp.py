"""Frames over persistent TCP connections: the direct transport between the gateway and the stages.

[Note: raw sockets, not streams] Python 3.11's ``StreamWriter.writelines`` joins its buffers (a copy of every
tensor) and ``StreamReader.readexactly`` copies the received bytes twice. This module drives non-blocking
sockets from the event loop instead: ``sendmsg`` writes the prefix, metadata and each tensor buffer straight
from their memory (scatter/gather), and large payloads are received with ``recv_into`` directly into the one
buffer the tensors are then viewed from. Small frames are read through a scratch buffer (few syscalls).

Every connection carries frames both ways: DATA/PING downstream, ERROR/LINK back upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import numpy as np

from layerline.errors import StageUnavailable, TransportError
from layerline.runtime.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    PREFIX_SIZE,
    Frame,
    decode_meta,
    decode_prefix,
    encode,
    frame_from_parts,
)
from layerline.runtime.transport import (
    BackwardHandler,
    ConnectionClosed,
    LinkHandler,
    Received,
    UpstreamHandler,
)

__all__ = ["FrameConnection", "TcpInbox", "TcpOutbox", "listen_socket", "open_connection"]

log = logging.getLogger(__name__)

_SCRATCH_BYTES = 256 * 1024
_DIRECT_MIN = 64 * 1024  # a remainder at least this large is received straight into its target
_IOV_MAX = 512


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A peer that vanishes without closing (a device off the network) is noticed in about 20 s.
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class FrameConnection:
    """One TCP connection carrying frames; one reader and any number of writers (writes are serialized)."""

    def __init__(
        self, sock: socket.socket, peer: str, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        _configure(sock)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray(_SCRATCH_BYTES)
        self._mv = memoryview(self._buf)
        self._lo = self._hi = 0
        self._last_recv = 0.0
        self._mark: float | None = None
        self._wlock = asyncio.Lock()
        self._waiters: set[asyncio.Future] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the socket; pending reads and writes fail with ``ConnectionClosed``."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(ConnectionClosed(f"connection to {self.peer} was closed"))
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    async def _wait(self, add: Callable, remove: Callable) -> None:
        fut = self._loop.create_future()
        self._waiters.add(fut)
        add(self._fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if not self._closed:
                remove(self._fd)

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer} was closed")

    # -- reading -------------------------------------------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            self._check_open()
            try:
                n = self._sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                await self._wait(self._loop.add_reader, self._loop.remove_reader)
                continue
            except OSError as exc:
                raise ConnectionClosed(f"connection to {self.peer} broke: {exc}") from exc
            if n == 0:
                raise ConnectionClosed(f"{self.peer} closed the connection")
            self._last_recv = time.monotonic()
            if self._mark is None:
                self._mark = self._last_recv
            return n

    async def _read_into(self, view: memoryview) -> None:
        """Fill ``view`` completely: first from the scratch buffer, then from the socket."""
        need = len(view)
        pos = min(self._hi - self._lo, need)
        if pos:
            view[:pos] = self._mv[self._lo : self._lo + pos]
            self._lo += pos
        while pos < need:
            rest = need - pos
            if rest >= _DIRECT_MIN:
                pos += await self._recv_into(view[pos:])
                continue
            # Scratch is empty here; reading into it may also pick up the next frames' bytes.
            self._lo = self._hi = 0
            self._hi = await self._recv_into(self._mv)
            k = min(self._hi, rest)
            view[pos : pos + k] = self._mv[:k]
            self._lo = k
            pos += k

    async def read(self) -> Received:
        """The next frame. Raises ``ConnectionClosed`` at end of stream, ``ProtocolError`` on bad bytes."""
        self._mark = self._last_recv if self._hi > self._lo else None
        head = bytearray(PREFIX_SIZE)
        await self._read_into(memoryview(head))
        started = self._mark if self._mark is not None else time.monotonic()
        prefix = decode_prefix(head, self.max_frame_bytes)
        meta_bytes = bytearray(prefix.meta_len)
        if prefix.meta_len:
            await self._read_into(memoryview(meta_bytes))
        meta = decode_meta(prefix, meta_bytes)
        payload = np.empty(prefix.payload_len, dtype=np.uint8)
        if prefix.payload_len:
            await self._read_into(memoryview(payload))
        frame = frame_from_parts(prefix, meta, payload)
        return Received(frame, started, time.monotonic())

    # -- writing -------------------------------------------------------------------------------------------

    async def _send_all(self, buffers: list) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        i = 0
        while i < len(views):
            self._check_open()
            try:
                n = self._sock.sendmsg(views[i : i + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                await self._wait(self._loop.add_writer, self._loop.remove_writer)
                continue
            except OSError as exc:
                raise ConnectionClosed(f"connection to {self.peer} broke: {exc}") from exc
            while n and i < len(views):
                if n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0

    async def write(self, frame: Frame, deadline: float | None = None) -> float:
        """Write one frame; with a ``deadline`` (monotonic) its budget is what is left of it now.

        Returns the seconds spent writing. A write interrupted half-way closes the connection (the
        stream cannot be resynchronised).
        """
        async with self._wlock:
            if deadline is not None:
                frame = dataclasses.replace(frame, budget_ms=(deadline - time.monotonic()) * 1000.0)
            buffers = encode(frame, self.max_frame_bytes)
            t0 = time.monotonic()
            try:
                await self._send_all(buffers)
            except BaseException:
                self.close()
                raise
            return time.monotonic() - t0


def listen_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """A non-blocking listening socket (``port`` 0 picks a free one: read it from ``getsockname()``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def open_connection(
    host: str, port: int, *, timeout_s: float = 2.0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> FrameConnection:
    """Connect to ``host:port``. Raises ``OSError`` (refused, unreachable, timed out)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, addr), timeout_s)
    except asyncio.TimeoutError:
        sock.close()
        raise TimeoutError(f"connecting to {host}:{port} timed out after {timeout_s} s") from None
    except BaseException:
        sock.close()
        raise
    return FrameConnection(sock, f"{host}:{port}", max_frame_bytes)


class TcpInbox:
    """Listens on ``host:port``; frames from every upstream connection are merged in arrival order.

    At most ``queue_size`` received frames wait for :meth:`receive`; beyond that the readers stop
    reading their sockets, and TCP flow control pushes back on the senders.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        queue_size: int = 1,
        name: str = "inbox",
    ) -> None:
        self.host = host
        self._port = port
        self.max_frame_bytes = max_frame_bytes
        self.name = name
        self._queue: asyncio.Queue[Received | None] = asyncio.Queue(max(1, queue_size))
        self._conns: dict[FrameConnection, asyncio.Task] = {}
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._on_upstream: UpstreamHandler | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        return self._lsock.getsockname()[1] if self._lsock is not None else self._port

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self, on_upstream: UpstreamHandler | None = None) -> None:
        self._on_upstream = on_upstream
        self._lsock = listen_socket(self.host, self._port)
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"{self.name}-accept")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            try:
                sock, addr = await loop.sock_accept(self._lsock)
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            conn = FrameConnection(sock, f"{addr[0]}:{addr[1]}", self.max_frame_bytes)
            self._conns[conn] = asyncio.create_task(self._read_loop(conn), name=f"{self.name}-read")
            log.debug("%s: upstream %s connected", self.name, conn.peer)
            if self._on_upstream is not None:
                try:
                    await self._on_upstream()
                except Exception:
                    log.exception("%s: upstream handler failed", self.name)

    async def _read_loop(self, conn: FrameConnection) -> None:
        try:
            while True:
                await self._queue.put(await conn.read())
        except ConnectionClosed as exc:
            log.debug("%s: upstream %s gone: %s", self.name, conn.peer, exc)
        except TransportError as exc:  # ProtocolError: the stream cannot be trusted any more
            log.warning("%s: dropping upstream %s: %s", self.name, conn.peer, exc)
        finally:
            conn.close()
            self._conns.pop(conn, None)

    async def receive(self) -> Received:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # wake any other receiver too
            raise ConnectionClosed(f"{self.name} is closed")
        return item

    async def send_back(self, frame: Frame) -> None:
        """Send ``frame`` to every connected upstream peer (normally exactly one)."""
        if not self._conns:
            log.debug("%s: no upstream connected; dropped a %s frame", self.name, frame.kind.name)
        for conn in list(self._conns):
            try:
                await conn.write(frame)
            except TransportError as exc:
                log.debug("%s: could not send back to %s: %s", self.name, conn.peer, exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._accept_task, *self._conns.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._conns):
            conn.close()
        if self._lsock is not None:
            self._lsock.close()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


class TcpOutbox:
    """A persistent connection to ``host:port`` that reconnects with exponential backoff when it drops.

    ``hello`` is written first on every new connection. Frames coming back on the connection go to
    ``on_backward``; link transitions (and the first failed attempt) go to ``on_link``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        hello: Frame | None = None,
        backoff_s: tuple[float, float] = (0.05, 1.0),
        connect_timeout_s: float = 2.0,
        name: str = "outbox",
    ) -> None:
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.hello = hello
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.name = name
        self._conn: FrameConnection | None = None
        self._task: asyncio.Task | None = None
        self._up = asyncio.Event()
        self.last_error = "not connected yet"

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, on_backward: BackwardHandler, on_link: LinkHandler) -> None:
        self._task = asyncio.create_task(self._link_loop(on_backward, on_link), name=f"{self.name}-link")

    async def wait_connected(self, timeout_s: float) -> bool:
        """True once connected (False if that did not happen within ``timeout_s``)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self.connected

    async def _notify(self, handler: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await handler(*args)
        except Exception:
            log.exception("%s: handler failed", self.name)

    async def _link_loop(self, on_backward: BackwardHandler, on_link: LinkHandler) -> None:
        delay = self.backoff_s[0]
        reported_down = False
        while True:
            try:
                conn = await open_connection(
                    self.host,
                    self.port,
                    timeout_s=self.connect_timeout_s,
                    max_frame_bytes=self.max_frame_bytes,
                )
                if self.hello is not None:
                    await conn.write(self.hello)
            except (OSError, TransportError) as exc:
                reason = os.strerror(exc.errno) if getattr(exc, "errno", None) else str(exc)
                self.last_error = reason
                if not reported_down:
                    log.warning("%s: cannot connect to %s: %s (retrying)", self.name, self.peer, reason)
                    reported_down = True
                    await self._notify(on_link, False, f"cannot reach {self.peer}: {reason}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_s[1])
                continue
            delay = self.backoff_s[0]
            reported_down = False
            self._conn = conn
            self._up.set()
            log.info("%s: connected to %s", self.name, self.peer)
            await self._notify(on_link, True, f"connected to {self.peer}")
            try:
                while True:
                    received = await conn.read()
                    await self._notify(on_backward, received)
            except TransportError as exc:
                self.last_error = f"connection lost: {exc}"
            finally:
                self._up.clear()
                self._conn = None
                conn.close()
            log.warning("%s: %s: %s (reconnecting)", self.name, self.peer, self.last_error)
            reported_down = True
            await self._notify(on_link, False, f"{self.peer}: {self.last_error}")

    async def send(self, frame: Frame, deadline: float | None = None) -> float:
        conn = self._conn
        if conn is None or conn.closed:
            raise StageUnavailable(f"{self.peer} is not connected: {self.last_error}")
        try:
            return await conn.write(frame, deadline)
        except ConnectionClosed as exc:
            self.last_error = f"connection lost: {exc}"
            conn.close()
            raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
