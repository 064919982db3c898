"""Starting, checking and stopping the background processes of the local engine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from layerline.runtime.ports import free_port, port_in_use

__all__ = ["free_port", "is_running", "port_in_use", "spawn", "stop_processes", "tail"]

#: Every process the engine starts carries this in its command line, so that a recycled pid of some other
#: program is never taken for ours (and never killed).
MARKER = "layerline"


def spawn(args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m ...`` style ``args`` in its own session, stdout and stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    # Until exec completes, /proc/PID/cmdline is empty and is_running() would call the new process dead.
    deadline = time.monotonic() + 5.0
    while proc.poll() is None and MARKER not in _cmdline(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    return proc


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_running(pid: int) -> bool:
    """True when ``pid`` is alive, not a zombie, and ours (its command line names layerline)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return MARKER in _cmdline(pid)


def stop_processes(pids: Sequence[int], timeout_s: float = 5.0) -> list[int]:
    """SIGTERM each running pid, wait up to ``timeout_s``, then SIGKILL survivors; return the stopped."""
    ours = [p for p in pids if is_running(p)]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_running(p) for p in ours):
        time.sleep(0.05)
    for pid in ours:
        if is_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(is_running(p) for p in ours):
        time.sleep(0.05)
    return ours


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
