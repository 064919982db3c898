"""One TCP connection carrying layerline frames both ways, driven directly by the event loop.

[Note: raw sockets, not streams] Python 3.11's ``StreamWriter.writelines`` joins its buffers (a copy of every
tensor), its transports copy whatever the kernel does not take at once, and ``StreamReader.readexactly``
copies received bytes twice. :class:`FrameConnection` drives a non-blocking socket from the event loop
itself, like a protocol: a persistent reader callback parses frames as bytes arrive (small frames through a
scratch buffer, large payloads with ``recv_into`` straight into the one buffer the tensors are viewed
from), and a write queue sends each frame's prefix, metadata and tensor buffers with ``sendmsg`` from
their own memory. A frame's budget is computed when its first byte goes out, not when it was queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from layerline.errors import TransportError
from layerline.runtime.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    PREFIX_SIZE,
    ErrorInfo,
    Frame,
    Kind,
    decode_meta,
    decode_prefix,
    encode,
    frame_from_parts,
)
from layerline.runtime.transport import ConnectionClosed, Received

__all__ = [
    "CloseHandler",
    "FrameConnection",
    "FrameHandler",
    "failed_future",
    "listen_socket",
    "open_connection",
    "send_some",
]

log = logging.getLogger(__name__)

_SCRATCH_BYTES = 256 * 1024
_DIRECT_MIN = 64 * 1024  # a remainder at least this large is received straight into its target
_IOV_MAX = 512
_PREFIX, _META, _PAYLOAD = range(3)

FrameHandler = Callable[[Received], None]
CloseHandler = Callable[[TransportError], None]


def _configure(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A peer that vanishes without closing (a device off the network) is noticed in about 20 s.
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    """Fail ``fut`` without an "exception was never retrieved" warning: whoever cares has a callback."""
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()


def send_some(sock: socket.socket, buffers: deque[bytes | memoryview]) -> None:
    """One ``sendmsg`` of the first buffers of ``buffers`` (at most ``_IOV_MAX``), dropping what went out.

    A buffer sent in part is replaced by a view of its rest. Raises what ``sendmsg`` raises
    (``BlockingIOError`` when the socket is full). Shared with :mod:`layerline.runtime.redis_resp`.
    """
    n = sock.sendmsg(list(itertools.islice(buffers, _IOV_MAX)))
    while n:
        first = buffers[0]
        if n >= len(first):
            n -= len(first)
            buffers.popleft()
        else:
            buffers[0] = memoryview(first)[n:]
            n = 0


def failed_future(exc: BaseException) -> asyncio.Future:
    """A future that has already failed with ``exc`` (and does not warn if nobody looks)."""
    fut = asyncio.get_running_loop().create_future()
    _fail(fut, exc)
    return fut


class FrameConnection:
    """One TCP connection carrying frames both ways.

    ``start(on_frame, on_close)`` begins reading: ``on_frame`` is called (in the event loop) with each
    complete frame, ``on_close`` once with the reason the connection ended. ``send`` queues a frame and
    returns a future that completes when its last byte is handed to the kernel. ``pause_reading`` and
    ``resume_reading`` apply back-pressure: the kernel buffers fill and TCP slows the peer down.
    """

    def __init__(
        self, sock: socket.socket, peer: str, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        _configure(sock)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._closed = False
        self._on_frame: FrameHandler | None = None
        self._on_close: CloseHandler | None = None
        # reading: undelivered scratch bytes are [_lo, _hi); the frame part being filled is _target
        self._scratch = bytearray(_SCRATCH_BYTES)
        self._smv = memoryview(self._scratch)
        self._lo = self._hi = 0
        self._head = bytearray(PREFIX_SIZE)
        self._stage = _PREFIX
        self._target = memoryview(self._head)
        self._tpos = 0
        self._prefix = None
        self._meta_buf = bytearray()
        self._meta = None
        self._payload: np.ndarray | None = None
        self._started = self._recv_time = 0.0
        self._reader_on = False
        self._paused = False
        # writing
        self._wqueue: deque[tuple[Frame, float | None, asyncio.Future]] = deque()
        self._wbufs: deque[memoryview] = deque()
        self._wfut: asyncio.Future | None = None
        self._wt0 = 0.0
        self._writer_on = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def write_backlog(self) -> int:
        """Frames queued or being written."""
        return len(self._wqueue) + (self._wfut is not None)

    def start(self, on_frame: FrameHandler, on_close: CloseHandler | None = None) -> None:
        self._on_frame, self._on_close = on_frame, on_close
        self._set_reader(True)

    def close(self, reason: TransportError | None = None) -> None:
        """Close the socket; queued writes fail with ``ConnectionClosed``; ``on_close`` gets ``reason``."""
        if self._closed:
            return
        self._closed = True
        reason = reason or ConnectionClosed(f"connection to {self.peer} was closed")
        self._set_reader(False)
        if self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False
        futures = [self._wfut, *(f for _, _, f in self._wqueue)]
        self._wqueue.clear()
        self._wbufs.clear()
        self._wfut = None
        for fut in futures:
            if fut is not None:
                _fail(fut, ConnectionClosed(f"connection to {self.peer} closed before the write"))
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._on_close is not None:
            self._loop.call_soon(self._on_close, reason)

    # -- reading -------------------------------------------------------------------------------------------

    def _set_reader(self, on: bool) -> None:
        if on and not self._reader_on and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reader_on = True
        elif not on and self._reader_on:
            self._loop.remove_reader(self._fd)
            self._reader_on = False

    def pause_reading(self) -> None:
        self._paused = True
        self._set_reader(False)

    def resume_reading(self) -> None:
        if not self._paused or self._closed:
            return
        self._paused = False
        self._guarded(self._drain)
        if not self._paused:
            self._set_reader(True)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except TransportError as exc:  # ProtocolError: the stream cannot be trusted any more
            log.warning("dropping the connection to %s: %s", self.peer, exc)
            # Tell the peer why (best effort: a peer of another version may not decode it either).
            self.send(Frame(Kind.ERROR, 0, error=ErrorInfo(-1, "protocol", f"invalid frame: {exc}")))
            self.close(exc)

    def _on_readable(self) -> None:
        if self._closed or self._paused:
            return
        direct = self._lo == self._hi and len(self._target) - self._tpos >= _DIRECT_MIN
        try:
            if direct:
                n = self._sock.recv_into(self._target[self._tpos :])
            else:
                if self._lo == self._hi:
                    self._lo = self._hi = 0
                elif self._hi == len(self._scratch):  # only after a pause: keep the undelivered bytes
                    self._scratch[: self._hi - self._lo] = self._scratch[self._lo : self._hi]
                    self._lo, self._hi = 0, self._hi - self._lo
                n = self._sock.recv_into(self._smv[self._hi :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(ConnectionClosed(f"connection to {self.peer} broke: {exc}"))
            return
        if n == 0:
            self.close(ConnectionClosed(f"{self.peer} closed the connection"))
            return
        self._recv_time = time.monotonic()
        if direct:
            self._tpos += n
            self._guarded(self._advance)
        else:
            self._hi += n
        self._guarded(self._drain)

    def _drain(self) -> None:
        """Move buffered scratch bytes into the frame being assembled, delivering complete frames."""
        while self._lo < self._hi and not self._paused and not self._closed:
            if self._stage == _PREFIX and self._tpos == 0:
                self._started = self._recv_time
            k = min(self._hi - self._lo, len(self._target) - self._tpos)
            self._target[self._tpos : self._tpos + k] = self._smv[self._lo : self._lo + k]
            self._tpos += k
            self._lo += k
            self._advance()

    def _advance(self) -> None:
        while self._tpos == len(self._target) and not self._closed:
            self._tpos = 0
            if self._stage == _PREFIX:
                self._prefix = decode_prefix(self._head, self.max_frame_bytes)
                self._stage = _META
                self._meta_buf = bytearray(self._prefix.meta_len)
                self._target = memoryview(self._meta_buf)
            elif self._stage == _META:
                self._meta = decode_meta(self._prefix, self._meta_buf)
                self._stage = _PAYLOAD
                self._payload = np.empty(self._prefix.payload_len, dtype=np.uint8)
                self._target = memoryview(self._payload)
            else:
                frame = frame_from_parts(self._prefix, self._meta, self._payload)
                self._stage, self._target = _PREFIX, memoryview(self._head)
                self._prefix = self._meta = self._payload = None
                received = Received(frame, self._started, time.monotonic())
                assert self._on_frame is not None
                try:
                    self._on_frame(received)
                except Exception:
                    log.exception("frame handler failed for a frame from %s", self.peer)
                return

    # -- writing -------------------------------------------------------------------------------------------

    def send(self, frame: Frame, deadline: float | None = None) -> asyncio.Future:
        """Queue ``frame``; with a ``deadline`` (monotonic) its budget is what is left when it goes out.

        The returned future's result is the seconds spent writing; it fails with ``ConnectionClosed``
        or, for a frame that cannot be encoded, ``ProtocolError``. Cancelling it does not stop the write.
        """
        if self._closed:
            return failed_future(ConnectionClosed(f"connection to {self.peer} is closed"))
        fut = self._loop.create_future()
        self._wqueue.append((frame, deadline, fut))
        if not self._writer_on:
            self._flush()
        return fut

    async def write(self, frame: Frame, deadline: float | None = None) -> float:
        """``send`` and wait until the frame is written."""
        return await self.send(frame, deadline)

    def _next_frame(self) -> bool:
        while self._wqueue:
            frame, deadline, fut = self._wqueue.popleft()
            budget = None if deadline is None else (deadline - time.monotonic()) * 1000.0
            try:
                buffers = encode(frame, self.max_frame_bytes, budget)
            except TransportError as exc:
                _fail(fut, exc)
                continue
            self._wbufs.extend(memoryview(b).cast("B") for b in buffers if len(b))
            self._wfut, self._wt0 = fut, time.monotonic()
            return True
        return False

    def _flush(self) -> None:
        while not self._closed:
            if not self._wbufs and not self._next_frame():
                if self._writer_on:
                    self._loop.remove_writer(self._fd)
                    self._writer_on = False
                return
            try:
                send_some(self._sock, self._wbufs)
            except (BlockingIOError, InterruptedError):
                if not self._writer_on:
                    self._loop.add_writer(self._fd, self._flush)
                    self._writer_on = True
                return
            except OSError as exc:
                self.close(ConnectionClosed(f"connection to {self.peer} broke: {exc}"))
                return
            if not self._wbufs:
                fut, self._wfut = self._wfut, None
                if fut is not None and not fut.done():
                    fut.set_result(time.monotonic() - self._wt0)


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
    if sock.getsockname() == sock.getpeername():
        # TCP self-connect: with nothing listening on a loopback port in the ephemeral range, a connect
        # can pick that very port as its own source and connect to itself (and then hold the port).
        sock.close()
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens on {host}:{port} (self-connect)")
    return FrameConnection(sock, f"{host}:{port}", max_frame_bytes)
