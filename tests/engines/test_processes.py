"""Process bookkeeping of the local engine, on real child processes."""

from __future__ import annotations

import subprocess
import sys

from layerline.engines import processes


def test_a_just_spawned_process_counts_as_running(tmp_path):
    """/proc/PID/cmdline is empty until exec completes; spawn() must not return before that."""
    children = [
        processes.spawn(["-c", "import time; time.sleep(5)", "layerline-test"], tmp_path / f"{i}.log")
        for i in range(20)
    ]
    try:
        assert all(processes.is_running(p.pid) for p in children)
    finally:
        stopped = processes.stop_processes([p.pid for p in children], timeout_s=2)
    assert sorted(stopped) == sorted(p.pid for p in children)
    assert not any(processes.is_running(p.pid) for p in children)


def test_a_foreign_process_is_never_ours():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert not processes.is_running(other.pid)
        assert processes.stop_processes([other.pid]) == []
        assert other.poll() is None  # left alone
    finally:
        other.kill()
        other.wait()
