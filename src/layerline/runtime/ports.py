"""Picking TCP ports for listeners that another process will bind a moment later."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_ports", "port_in_use"]


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on ``host:port`` (or the address cannot be bound).

    SO_REUSEADDR as servers set it, so closed connections lingering in TIME_WAIT do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, chosen below the kernel's ephemeral range.

    A port is picked here and bound later by another process. Ports from the ephemeral range (what
    ``bind(0)`` returns) are also handed out to outgoing connections in between, and a worker then found
    its port taken; listeners below that range do not collide with outgoing connections.
    """
    low, _ = _ephemeral_range()
    if low > 12000:
        for _ in range(200):
            port = random.randint(10000, low - 1)
            if not port_in_use(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (see :func:`free_port`)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports
