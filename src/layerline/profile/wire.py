"""The profiling agents' control channel: JSON lines over TCP, each optionally followed by raw bytes.

A message is one UTF-8 JSON object on one line (``\\n``-terminated, at most 1 MiB). When the object has
``"payload_bytes": N`` the next N bytes on the connection are its raw payload (an ONNX file, or a
bandwidth test buffer). Nothing is ever unpickled or evaluated. Layout in ``docs/profile.md``.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from layerline.errors import ProtocolError, TransportError

__all__ = ["MAX_LINE", "MAX_PAYLOAD", "Channel", "connect"]

MAX_LINE = 1 << 20
MAX_PAYLOAD = 1 << 31
_CHUNK = 1 << 20


class Channel:
    """One connection carrying JSON-line messages; ``timeout_s`` bounds every read and write."""

    def __init__(self, sock: socket.socket, peer: str, timeout_s: float | None = 30.0) -> None:
        self.sock = sock
        self.peer = peer
        sock.settimeout(timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def settimeout(self, timeout_s: float | None) -> None:
        self.sock.settimeout(timeout_s)

    def send(self, msg: dict[str, Any], payload: bytes | memoryview | None = None) -> None:
        if payload is not None:
            msg = {**msg, "payload_bytes": len(payload)}
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            if payload is None or len(payload) == 0:
                self.sock.sendall(line)
            else:
                self.sock.sendall(line)
                self.sock.sendall(payload)
        except TimeoutError:
            raise TransportError(f"sending to {self.peer} timed out") from None
        except OSError as exc:
            raise TransportError(f"cannot send to {self.peer}: {exc}") from None

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(_CHUNK)
        except TimeoutError:
            raise TransportError(f"{self.peer} did not answer in time (timeout)") from None
        except OSError as exc:
            raise TransportError(f"connection to {self.peer} failed: {exc}") from None
        if not chunk:
            raise TransportError(f"{self.peer} closed the connection")
        self._buf += chunk

    def recv(self) -> tuple[dict[str, Any], bytes]:
        """The next message and its payload (b"" when it has none)."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                break
            if len(self._buf) > MAX_LINE:
                raise ProtocolError(f"{self.peer} sent a control line over {MAX_LINE} bytes")
            self._fill()
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        try:
            msg = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"{self.peer} sent a line that is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise ProtocolError(f"{self.peer} sent {type(msg).__name__}, expected a JSON object")
        n = msg.get("payload_bytes", 0)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_PAYLOAD:
            raise ProtocolError(f"{self.peer} announced an invalid payload_bytes {n!r}")
        while len(self._buf) < n:
            self._fill()
        payload = bytes(self._buf[:n])
        del self._buf[:n]
        return msg, payload

    def call(
        self, msg: dict[str, Any], payload: bytes | memoryview | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """Send ``msg`` and return the reply; an ``{"error": ...}`` reply raises TransportError."""
        self.send(msg, payload)
        reply, data = self.recv()
        if "error" in reply:
            raise TransportError(f"{self.peer}: {reply['error']}")
        return reply, data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(host: str, port: int, timeout_s: float = 30.0, peer: str | None = None) -> Channel:
    """Open a channel to ``host:port`` (TransportError naming the peer when it cannot)."""
    name = peer or f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise TransportError(f"cannot connect to {name} at {host}:{port}: {exc}") from None
    return Channel(sock, name, timeout_s)
