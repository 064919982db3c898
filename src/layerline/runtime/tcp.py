"""The direct TCP transport: a stage's :class:`~layerline.runtime.transport.Inbox` and ``Outbox``.

:class:`TcpInbox` listens for upstream connections and merges their frames (with back-pressure);
:class:`TcpOutbox` keeps one persistent, reconnecting connection to the next stage (or to the gateway's
result listener). Every connection carries frames both ways: DATA/PING downstream, ERROR/LINK back
upstream. The frame-level I/O is in :mod:`layerline.runtime.connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable

from layerline.errors import StageUnavailable, TransportError
from layerline.runtime.connection import (
    FrameConnection,
    FrameHandler,
    failed_future,
    listen_socket,
    open_connection,
)
from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES, Frame
from layerline.runtime.transport import (
    BackwardHandler,
    ConnectionClosed,
    LinkHandler,
    Received,
    UpstreamHandler,
)

__all__ = ["TcpInbox", "TcpOutbox"]

log = logging.getLogger(__name__)


class TcpInbox:
    """Listens on ``host:port``; frames from every upstream connection are merged in arrival order.

    At most ``queue_size`` received frames wait for :meth:`receive`; then every connection stops reading
    until one is taken, and TCP flow control pushes back on the senders. With a ``handler``, frames are
    passed to it as they arrive instead (the gateway's result listener), and :meth:`receive` is unused.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        queue_size: int = 1,
        name: str = "inbox",
        handler: FrameHandler | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.max_frame_bytes = max_frame_bytes
        self.queue_size = max(1, queue_size)
        self.name = name
        self._handler = handler
        self._frames: deque[Received] = deque()
        self._waiter: asyncio.Future | None = None
        self._paused = False
        self._conns: set[FrameConnection] = set()
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._on_upstream: UpstreamHandler | None = None
        self._background: set[asyncio.Task] = set()
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
            self._conns.add(conn)
            conn.start(self._handler or self._on_frame, lambda reason, c=conn: self._on_conn_close(c, reason))
            if self._paused:
                conn.pause_reading()
            log.debug("%s: upstream %s connected", self.name, conn.peer)
            if self._on_upstream is not None:
                task = asyncio.create_task(self._on_upstream())
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _on_conn_close(self, conn: FrameConnection, reason: TransportError) -> None:
        self._conns.discard(conn)
        log.debug("%s: upstream %s gone: %s", self.name, conn.peer, reason)

    def _on_frame(self, received: Received) -> None:
        self._frames.append(received)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if len(self._frames) >= self.queue_size and not self._paused:
            self._paused = True
            for conn in self._conns:
                conn.pause_reading()

    async def receive(self) -> Received:
        while not self._frames:
            if self._closed:
                raise ConnectionClosed(f"{self.name} is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        received = self._frames.popleft()
        if self._paused and len(self._frames) < self.queue_size:
            self._paused = False
            for conn in list(self._conns):
                conn.resume_reading()
        return received

    async def send_back(self, frame: Frame) -> None:
        """Send ``frame`` to every connected upstream peer (normally exactly one); does not wait."""
        if not self._conns:
            log.debug("%s: no upstream connected; dropped a %s frame", self.name, frame.kind.name)
        for conn in list(self._conns):
            conn.send(frame)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._accept_task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._conns):
            conn.close()
        if self._lsock is not None:
            self._lsock.close()
        self._frames.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


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
        self._background: set[asyncio.Task] = set()
        self._last_error = "not connected yet"

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def write_backlog(self) -> int:
        return self._conn.write_backlog if self._conn is not None else 0

    async def start(self, on_backward: BackwardHandler, on_link: LinkHandler) -> None:
        self._task = asyncio.create_task(self._link_loop(on_backward, on_link), name=f"{self.name}-link")

    async def wait_connected(self, timeout_s: float) -> bool:
        """True once connected (False if that did not happen within ``timeout_s``)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self.connected

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify(self, handler: Callable, *args: object) -> None:
        try:
            await handler(*args)
        except Exception:
            log.exception("%s: handler failed", self.name)

    async def _link_loop(self, on_backward: BackwardHandler, on_link: LinkHandler) -> None:
        loop = asyncio.get_running_loop()
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
            except OSError as exc:
                self._last_error = os.strerror(exc.errno) if exc.errno else str(exc)
                if not reported_down:
                    log.warning(
                        "%s: cannot connect to %s: %s (retrying)", self.name, self.peer, self._last_error
                    )
                    reported_down = True
                    await self._notify(on_link, False, f"cannot reach {self.peer}: {self._last_error}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_s[1])
                continue
            delay = self.backoff_s[0]
            reported_down = False
            ended: asyncio.Future = loop.create_future()

            def on_close(reason: TransportError, ended: asyncio.Future = ended) -> None:
                if not ended.done():
                    ended.set_result(reason)

            conn.start(lambda received: self._spawn(self._notify(on_backward, received)), on_close)
            if self.hello is not None:
                conn.send(self.hello)
            self._conn = conn
            self._up.set()
            log.info("%s: connected to %s", self.name, self.peer)
            await self._notify(on_link, True, f"connected to {self.peer}")
            try:
                reason = await ended
            finally:
                self._up.clear()
                self._conn = None
                conn.close()
            self._last_error = f"connection lost: {reason}"
            log.warning("%s: %s: %s (reconnecting)", self.name, self.peer, self._last_error)
            reported_down = True
            await self._notify(on_link, False, f"{self.peer}: {self._last_error}")

    def send(self, frame: Frame, deadline: float | None = None) -> asyncio.Future:
        conn = self._conn
        if conn is None or conn.closed:
            return failed_future(StageUnavailable(f"{self.peer} is not connected: {self._last_error}"))
        return conn.send(frame, deadline)

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
