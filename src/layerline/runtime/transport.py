"""What a stage needs from the thing that carries its frames: an inbox and an outbox.

The worker loop (``layerline.runtime.worker``) is written only against these two protocols, so that the
direct TCP chain (``layerline.runtime.tcp``) can be replaced by a broker (Redis Streams) without touching it.

Directions: DATA and PING frames travel *downstream* (gateway → stage 0 → … → result listener); ERROR and
LINK frames travel *back upstream* toward the gateway. An :class:`Inbox` receives downstream-bound frames and
can send frames back to whoever sent them (``send_back``); an :class:`Outbox` sends downstream-bound frames
and reports what comes back from downstream and whether the link is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from layerline.errors import TransportError
from layerline.runtime.framing import Frame

__all__ = [
    "BackwardHandler",
    "ConnectionClosed",
    "Inbox",
    "LinkHandler",
    "Outbox",
    "Received",
    "UpstreamHandler",
]


@dataclass(frozen=True)
class Received:
    """A frame and when it arrived (``time.monotonic()`` of this process).

    ``started``: its first byte arrived (a budget counts from here); ``finished``: its last byte arrived.
    """

    frame: Frame
    started: float
    finished: float

    @property
    def transfer_s(self) -> float:
        return self.finished - self.started


#: Called with every frame that comes back from downstream (ERROR, LINK, returned PING).
BackwardHandler = Callable[[Received], Awaitable[None]]
#: Called when the downstream link goes up (True) or down (False), with a human-readable detail.
LinkHandler = Callable[[bool, str], Awaitable[None]]
#: Called when a new upstream peer connects (a stage sends it its current link state).
UpstreamHandler = Callable[[], Awaitable[None]]


@runtime_checkable
class Inbox(Protocol):
    """Frames from upstream, in arrival order. Not calling :meth:`receive` applies back-pressure."""

    async def start(self, on_upstream: UpstreamHandler | None = None) -> None: ...

    async def receive(self) -> Received:
        """The next frame; raises ``TransportError`` once the inbox is closed."""
        ...

    async def send_back(self, frame: Frame) -> None:
        """Send a frame back toward the gateway (best effort: dropped, with a log line, if nobody listens)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Outbox(Protocol):
    """The link to the next stage (or, for the last stage, to the gateway's result listener)."""

    @property
    def connected(self) -> bool: ...

    @property
    def peer(self) -> str:
        """Where frames go, for messages (``host:port``, a stream name…)."""
        ...

    @property
    def last_error(self) -> str:
        """Why the link is (or last was) down, for messages."""
        ...

    async def start(self, on_backward: BackwardHandler, on_link: LinkHandler) -> None: ...

    def send(self, frame: Frame, deadline: float | None = None) -> asyncio.Future[float]:
        """Queue ``frame``; its budget is recomputed from ``deadline`` (monotonic) when it goes out.

        The future's result is the seconds spent writing. It fails with ``StageUnavailable`` when the
        link is down and ``TransportError`` when it breaks before the frame is written. Cancelling the
        future does not cancel the write (half a frame would break the stream for every request).
        """
        ...

    async def close(self) -> None: ...


class ConnectionClosed(TransportError):
    """The peer closed the connection, or it broke."""
