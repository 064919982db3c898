"""Testbed parts that need no root: the delayer's choice of delay, daemon paths, the swarm API's errors."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from layerline.testbed import FleetSpec, TestbedError, TestbedState, docker_host, swarm_manager
from layerline.testbed.delayer import DelayTable, main
from layerline.testbed.dockerd import MAX_SOCKET_PATH, plan_daemon
from layerline.testbed.state import DeviceRecord


def _ipv4_header(src: str, dst: str = "10.213.0.11") -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 60, 1, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )


def test_delay_is_picked_by_the_ipv4_source():
    table = DelayTable(5.0, {"10.213.0.12": 15.0, "10.213.0.10": 0.0})
    assert table.delay(_ipv4_header("10.213.0.12")) == pytest.approx(0.015)
    assert table.delay(_ipv4_header("10.213.0.10")) == 0.0
    assert table.delay(_ipv4_header("10.213.0.1")) == pytest.approx(0.005)  # the host: the default
    assert table.delay(None) == pytest.approx(0.005)  # metadata only
    assert table.delay(b"\x60" + bytes(39)) == pytest.approx(0.005)  # not IPv4
    assert table.delay(_ipv4_header("10.213.0.12")[:12]) == pytest.approx(0.005)  # truncated
    assert DelayTable(7.0).delay(_ipv4_header("10.213.0.12")) == pytest.approx(0.007)


def test_delayer_refuses_a_bad_pair():
    with pytest.raises(SystemExit):
        main(["--delay-ms", "5", "--from", "pi2=30"])


def test_daemon_paths_stay_short_enough_for_unix_sockets():
    short = plan_daemon(Path("/root/.layerline/testbed/docker"), "ll-abcdef", "pi1", ["/cg/cpu"])
    assert short.dir == "/root/.layerline/testbed/docker/pi1" and short.run_dir == short.dir
    assert short.host == f"unix://{short.dir}/docker.sock" and short.data_root.startswith(short.dir)
    deep = Path("/tmp").joinpath(*["d" * 20] * 3, "docker")
    long = plan_daemon(deep, "ll-abcdef", "a-long-device-1", ["/cg/cpu"])
    assert long.dir == str(deep / "a-long-device-1") and long.data_root.startswith(long.dir)
    assert long.run_dir == "/run/layerline-ll-abcdef/a-long-device-1"
    assert len(long.exec_root + "/containerd/containerd.sock.ttrpc") <= MAX_SOCKET_PATH


def test_swarm_api_names_the_fix():
    spec = FleetSpec.from_yaml_data({"devices": [{"name": "a", "cpu": 0.5, "memory": "64M"}]})
    dev = DeviceRecord(spec.devices[0], "10.213.0.10", "ll-x-a", "/cpu/a", "/memory/a")
    state = TestbedState("ll-x", spec, "ll-x-sw", "10.213.0.0/24", (dev,))
    with pytest.raises(TestbedError, match="runs no dockerd; set swarm: true"):
        docker_host(state, "a")
    with pytest.raises(TestbedError, match="no swarm: true device"):
        swarm_manager(state)
    assert TestbedState.from_json(state.to_json()) == state
