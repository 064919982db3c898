"""The emulated testbed for real: namespaces, shaped links, cgroup limits, clean-up (needs root, cgroup v1).

Traffic goes only between the testbed's own addresses (10.213.0.0/24 inside its namespaces).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerline.testbed import FleetSpec, TestbedError, device_argv, down, load_state, status, up
from layerline.testbed.cgroups import own_cgroup
from layerline.testbed.host import missing_requirements

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok"),
]

RATE_MBIT = 50
FLEET = {
    "name": "t",
    "devices": [
        {"name": "a", "cpu": 1.0, "memory": "128M", "link": {"rate": f"{RATE_MBIT}mbit"}},
        {"name": "b", "cpu": 0.25, "memory": "96M", "link": {"rate": f"{RATE_MBIT}mbit", "delay": "5ms"}},
    ],
}

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


def _leftovers(testbed_id: str, pids: list[int]) -> list[str]:
    """Everything a testbed could leave behind: namespaces, cgroup dirs, processes."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if testbed_id in line]
    for ctrl in ("cpu", "memory"):
        if (own_cgroup(ctrl) / testbed_id).exists():
            found.append(f"cgroup {ctrl}/{testbed_id}")
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            found.append(f"process {pid}")
    return found


def _host_iptables() -> str:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    home = tmp_path_factory.mktemp("testbed-home")
    state = up(FleetSpec.from_yaml_data(FLEET), home)
    yield home, state
    down(home)


def _in(state, device: str, *args: str, **kw) -> subprocess.Popen:
    argv = device_argv(state, device, [sys.executable, *args])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_fleet_comes_up_with_its_limits(testbed):
    home, state = testbed
    st = status(home)
    assert st is not None and st.healthy, st
    a, b = st.devices
    assert (a.address, b.address) == ("10.213.0.10", "10.213.0.11")
    assert (a.cpu_limit, b.cpu_limit) == (1.0, 0.25)
    assert (a.memory_limit, b.memory_limit) == (128 * 2**20, 96 * 2**20)
    assert a.delayer_pid is None and b.delayer_running is True
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
    assert 5.0 <= rtt <= 9.0


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


def test_down_after_kill9_leaves_nothing_and_repeats(tmp_path):
    rules = _host_iptables()
    state = up(FleetSpec.from_yaml_data(FLEET), tmp_path)
    delayer = state.processes()[0].pid
    assert delayer is not None
    sleeper = subprocess.Popen(device_argv(state, "a", ["sleep", "300"]))
    time.sleep(0.2)
    os.kill(delayer, signal.SIGKILL)
    removed = down(tmp_path)
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert removed and _leftovers(state.testbed_id, [delayer, sleeper.pid]) == []
    assert down(tmp_path) == []
    assert _host_iptables() == rules


def test_down_after_up_crashed_midway(tmp_path):
    code = (
        "import sys; from layerline.testbed import FleetSpec, up\n"
        f"up(FleetSpec.from_yaml_data({FLEET!r}), {str(tmp_path)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    state_file = tmp_path / "testbed" / "testbed.json"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (state_file.exists() and "netns" in state_file.read_text()):
        time.sleep(0.002)
    proc.kill()  # kill -9 in the middle of `up`
    proc.wait()
    state = load_state(tmp_path)
    assert state is not None
    down(tmp_path)
    assert _leftovers(state.testbed_id, [r.pid for r in state.processes() if r.pid]) == []
    assert load_state(tmp_path) is None
