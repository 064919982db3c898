"""Port picking for listeners started by another process."""

from __future__ import annotations

import socket

from layerline.runtime import ports


def test_port_in_use():

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert ports.port_in_use("127.0.0.1", port)
    assert not ports.port_in_use("127.0.0.1", port)


def test_free_ports_avoid_the_ephemeral_range():
    low, _ = ports._ephemeral_range()
    picked = {ports.free_port() for _ in range(50)}
    assert len(picked) > 40
    if low > 12000:
        assert all(10000 <= p < low for p in picked)


def test_free_ports_are_distinct():
    assert len(set(ports.free_ports(30))) == 30
