"""Clean-up of the emulated testbed after crashes (needs root, cgroup v1); each test makes its own testbed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from testbed_support import FLEET, host_iptables, leftovers

from layerline.testbed import FleetSpec, device_argv, down, load_state, up
from layerline.testbed.host import missing_requirements

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok"),
]


def test_down_after_kill9_leaves_nothing_and_repeats(tmp_path):
    rules = host_iptables()
    state = up(FleetSpec.from_yaml_data(FLEET), tmp_path)
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
