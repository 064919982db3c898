"""Clean-up of the emulated testbed after crashes (needs root, cgroup v1); each test makes its own testbed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testbed_support import FLEET, host_iptables, leftovers, up_when_free

from layerline.testbed import FleetSpec, device_argv, down, load_state
from layerline.testbed.host import missing_docker, missing_requirements

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok"),
]


def test_down_after_kill9_leaves_nothing_and_repeats(tmp_path):
    rules = host_iptables()
    state = up_when_free(FleetSpec.from_yaml_data(FLEET), tmp_path)
    delayer = state.processes()[0].pid
    assert delayer is not None
    sleeper = subprocess.Popen(device_argv(state, "a", ["sleep", "300"]))
    time.sleep(0.2)
    os.kill(delayer, signal.SIGKILL)
    removed = down(tmp_path)
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert removed and leftovers(state.testbed_id, [delayer, sleeper.pid]) == []
    assert down(tmp_path) == []
    assert host_iptables() == rules


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
    assert leftovers(state.testbed_id, [r.pid for r in state.processes() if r.pid]) == []
    assert load_state(tmp_path) is None


SWARM_PAIR = {
    "name": "pair",
    "devices": [{"name": n, "cpu": 0.25, "memory": "256M", "swarm": True} for n in ("s1", "s2")],
}


@pytest.mark.swarm
@pytest.mark.slow
@pytest.mark.skipif(bool(missing_docker()), reason="; ".join(missing_docker()) or "ok")
@pytest.mark.parametrize("when", ["dockerd:s1", "dockerd:s2"])
def test_down_after_up_killed_while_daemons_start(tmp_path, when):
    """kill -9 of `up` once a daemon is recorded (s1: while the others start; s2: before the swarm forms)."""
    code = (
        "from layerline.testbed import FleetSpec, up\n"
        f"up(FleetSpec.from_yaml_data({SWARM_PAIR!r}), {str(tmp_path)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    state_file = tmp_path / "testbed" / "testbed.json"
    deadline = time.monotonic() + 60
    while not (state_file.exists() and when in state_file.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "up ended before the daemon was recorded"
        time.sleep(0.002)
    time.sleep(0.3 if when == "dockerd:s2" else 0.0)  # s2: let the daemons come up first
    proc.kill()
    proc.wait()
    state = load_state(tmp_path)
    assert state is not None
    pids = [r.pid for r in state.processes() if r.pid]
    comms = [Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids if Path(f"/proc/{pid}").exists()]
    print(f"killed up after {when}: recorded processes are {comms}")
    if when == "dockerd:s2":
        assert "dockerd" in comms  # s1's daemon was running when up died
    down(tmp_path)
    assert leftovers(state.testbed_id, pids, [tmp_path]) == []
    assert load_state(tmp_path) is None
