"""The emulated testbed for real: namespaces, shaped links, cgroup limits, clean-up (needs root, cgroup v1).

Traffic goes only between the testbed's own addresses (10.213.0.0/24 inside its namespaces).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testbed_support import FLEET, RATE_MBIT, up_when_free

from layerline.testbed import FleetSpec, TestbedError, device_argv, down, load_state, status, up
from layerline.testbed.host import missing_requirements

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok"),
]

NETTOOL = r"""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "sink":
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port)); ls.listen(1); ls.settimeout(10)
    c, _ = ls.accept(); c.settimeout(10)
    if c.recv(1) == b"E":
        while d := c.recv(1):
            c.sendall(d)
        sys.exit(0)
    n, t0 = 0, None
    while d := c.recv(1 << 20):
        t0 = t0 or time.perf_counter()
        n += len(d)
    print(n * 8 / (time.perf_counter() - t0) / 1e6)
else:
    for _ in range(200):
        try:
            s = socket.create_connection((host, port), timeout=5); break
        except OSError:
            time.sleep(0.02)
    if mode == "echo":
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); s.sendall(b"E"); rtts = []
        for _ in range(20):
            t = time.perf_counter(); s.sendall(b"x"); s.recv(1); rtts.append((time.perf_counter() - t) * 1e3)
        print(sorted(rtts)[10])
    else:
        s.sendall(b"T"); buf = bytes(1 << 16); t0 = time.perf_counter()
        while time.perf_counter() - t0 < float(sys.argv[4]):
            s.sendall(buf)
        s.close()
"""

BURN = (
    "import time\nw, c = time.perf_counter(), time.process_time()\n"
    "while time.perf_counter() - w < 1.5:\n    pass\n"
    "print((time.process_time() - c) / (time.perf_counter() - w))"
)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    home = tmp_path_factory.mktemp("testbed-home")
    state = up_when_free(FleetSpec.from_yaml_data(FLEET), home)
    yield home, state
    down(home)


def _in(state, device: str, *args: str, **kw) -> subprocess.Popen:
    argv = device_argv(state, device, [sys.executable, *args])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_fleet_comes_up_with_its_limits(testbed):
    home, state = testbed
    st = status(home)
    assert st is not None and st.healthy, st
    a, b, c = st.devices
    assert (a.address, b.address, c.address) == ("10.213.0.10", "10.213.0.11", "10.213.0.12")
    assert (a.cpu_limit, b.cpu_limit) == (1.0, 0.25)
    assert (a.memory_limit, b.memory_limit) == (128 * 2**20, 96 * 2**20)
    assert a.delayer_pid is None and b.delayer_running is True and c.delayer_running is True
    assert a.docker_host is None and a.dockerd_running is None and a.node_state is None
    addr = subprocess.run(device_argv(state, "a", ["ip", "-o", "-4", "addr"]), capture_output=True, text=True)
    assert "10.213.0.10/24" in addr.stdout


def test_bandwidth_and_delay(testbed):
    _, state = testbed
    sink = _in(state, "b", "-c", NETTOOL, "sink", "10.213.0.11", "5301")
    _in(state, "a", "-c", NETTOOL, "send", "10.213.0.11", "5301", "2").communicate(timeout=20)
    mbit = float(sink.communicate(timeout=20)[0])
    print(f"measured {mbit:.1f} Mbit/s over a {RATE_MBIT} Mbit link")
    assert RATE_MBIT * 0.9 <= mbit <= RATE_MBIT * 1.1
    echo = _in(state, "b", "-c", NETTOOL, "sink", "10.213.0.11", "5302")
    rtt = float(_in(state, "a", "-c", NETTOOL, "echo", "10.213.0.11", "5302").communicate(timeout=20)[0])
    echo.communicate(timeout=20)
    print(f"median TCP round trip {rtt:.2f} ms with a 5 ms receive delay on b")
    assert 5.0 <= rtt <= 7.0  # within 2 ms of the spec


def _rtt(state, client: str, server: str, port: int) -> float:
    addr = state.device(server).address
    echo = _in(state, server, "-c", NETTOOL, "sink", addr, str(port))
    rtt = float(_in(state, client, "-c", NETTOOL, "echo", addr, str(port)).communicate(timeout=20)[0])
    echo.communicate(timeout=20)
    return rtt


def test_per_pair_delay_picks_the_delay_by_sender(testbed):
    _, state = testbed
    # b delays what it receives by 5 ms, but what comes from c by 15 ms; a and c delay nothing
    from_a, from_c = _rtt(state, "a", "b", 5304), _rtt(state, "c", "b", 5305)
    print(f"median TCP round trip a->b {from_a:.2f} ms (5 ms), c->b {from_c:.2f} ms (15 ms)")
    assert 5.0 <= from_a <= 7.0 and 15.0 <= from_c <= 17.0  # within 2 ms of the spec
    assert abs((from_c - from_a) - 10.0) <= 2.0
    # c delays only what comes from a (3 ms; its only iptables rule matches a's address), so what c
    # receives from b is not delayed: b<->c takes b's 15 ms alone
    assert _rtt(state, "b", "c", 5306) == pytest.approx(from_c, abs=2.0)
    a_c = _rtt(state, "a", "c", 5307)
    print(f"median TCP round trip a->c {a_c:.2f} ms (3 ms)")
    assert 3.0 <= a_c <= 5.0


def test_host_reaches_the_devices_through_its_port(testbed):
    _, state = testbed
    echo = _in(state, "b", "-c", NETTOOL, "sink", "10.213.0.11", "5303")
    client = subprocess.run(
        [sys.executable, "-c", NETTOOL, "echo", "10.213.0.11", "5303"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    echo.communicate(timeout=20)
    assert client.returncode == 0, client.stderr
    rtt = float(client.stdout)
    print(f"host -> b round trip {rtt:.2f} ms (b delays what it receives by 5 ms)")
    assert 5.0 <= rtt <= 9.0
    routes = subprocess.run(["ip", "-4", "-o", "route"], capture_output=True, text=True, check=True).stdout
    assert f"10.213.0.0/24 dev {state.testbed_id}-h" in routes


def test_cpu_quota(testbed):
    _, state = testbed
    procs = {d: _in(state, d, "-c", BURN) for d in ("a", "b")}
    ratio = {d: float(p.communicate(timeout=20)[0]) for d, p in procs.items()}
    print(f"CPU-time/wall: a (1.0 core) {ratio['a']:.3f}, b (0.25 core) {ratio['b']:.3f}")
    assert ratio["b"] == pytest.approx(0.25, rel=0.05)
    assert ratio["a"] / ratio["b"] >= 3


def test_memory_limit_kills_inside_the_device(testbed):
    _, state = testbed
    oom_file = Path(state.device("b").memory_cgroup) / "memory.oom_control"
    before = int(oom_file.read_text().split("oom_kill ")[1].split()[0])
    hog = _in(state, "b", "-c", "b = b'x' * (300 << 20); print('survived')")
    out, _ = hog.communicate(timeout=30)
    assert hog.returncode == -signal.SIGKILL and "survived" not in out
    assert int(oom_file.read_text().split("oom_kill ")[1].split()[0]) > before
    assert os.getpid() > 0  # this (host) process is still running


def test_up_while_up_refuses_with_the_fix(testbed):
    home, _ = testbed
    with pytest.raises(TestbedError, match="layerline testbed down"):
        up(FleetSpec.from_yaml_data(FLEET), home)


def test_cli_exec_status(testbed):
    home, _ = testbed
    env = {**os.environ, "LAYERLINE_HOME": str(home)}
    cli = [sys.executable, "-m", "layerline.cli.main", "testbed"]
    out = subprocess.run(
        [*cli, "exec", "b", "--", "cat", "/proc/self/cgroup"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"/{load_state(home).testbed_id}/b" in out.stdout
    js = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True)
    assert js.returncode == 0 and '"healthy": true' in js.stdout
