"""Starting, checking and stopping the background processes of the local engine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from layerline.runtime.ports import free_port, port_in_use

__all__ = [
    "find_processes",
    "free_port",
    "is_running",
    "port_in_use",
    "port_open",
    "spawn",
    "stop_processes",
    "tail",
]

#: Every process the engine starts carries this in its command line, so that a recycled pid of some other
#: program is never taken for ours (and never killed).
MARKER = "layerline"


def spawn(
    args: Sequence[str],
    log: Path,
    env: dict[str, str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> subprocess.Popen:
    """Start ``python -m ...`` style ``args`` in its own session, stdout and stderr to ``log``.

    ``wrap`` turns the command into the argv actually run, one that ends by exec-ing the command in the
    same process (``layerline.testbed.device_argv``: ``sh -c '... exec nsenter ... -- "$@"'``), so the pid
    returned is the command's own. Returns once the command itself runs (its exec is done).
    """
    command = [sys.executable, *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            wrap(command) if wrap is not None else command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    # Until exec completes, /proc/PID/cmdline is the parent's copy (or empty) and is_running() could call
    # the new process dead; a wrapper's own command line is not the command's either.
    expected = b"\0".join(os.fsencode(a) for a in command) + b"\0"
    deadline = time.monotonic() + 5.0
    while proc.poll() is None and _raw_cmdline(proc.pid) != expected and time.monotonic() < deadline:
        time.sleep(0.001)
    return proc


def _raw_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


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


def find_processes(fragment: str) -> list[int]:
    """Pids of our processes (see :func:`is_running`) with an argument that contains ``fragment`` (a
    deployment directory: what its workers' ``--config`` names), this process excluded."""
    found = []
    needle = os.fsencode(fragment)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        args = _raw_cmdline(int(entry.name)).split(b"\0")
        if any(needle in a for a in args) and is_running(int(entry.name)):
            found.append(int(entry.name))
    return found


def port_open(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True when something accepts connections on ``host:port`` (a listener on another machine or in a
    testbed device, where :func:`port_in_use`'s bind test cannot tell); a timeout counts as open."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect((host, port))
        except TimeoutError:
            return True
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
