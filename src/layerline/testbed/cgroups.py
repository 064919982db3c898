"""cgroup v1 limits per device: ``cpu.cfs_quota_us`` (CPU share) and ``memory.limit_in_bytes``.

A testbed's cgroups nest under the cgroup of the process that ran ``up`` (in each hierarchy), as
``TESTBED_ID/DEVICE``, so whatever limits the host already puts on that process still apply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from layerline.testbed.errors import TestbedError
from layerline.testbed.host import CGROUP_ROOT

__all__ = [
    "CFS_PERIOD_US",
    "cgroup_pids",
    "create_cgroup",
    "own_cgroup",
    "remove_cgroup",
    "set_cpu_limit",
    "set_cpu_weight",
    "set_memory_limit",
]

log = logging.getLogger(__name__)

# 10 ms, like the profiling agents' quotas (docs/profile.md): with 100 ms a 2 ms block mostly runs at full
# speed until the period's budget is spent, so a slow device looks fast in bursts instead of uniformly slow
CFS_PERIOD_US = 10_000


def own_cgroup(controller: str) -> Path:
    """The directory of this process's cgroup in the v1 hierarchy of ``controller``."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_ROOT / controller / path.lstrip("/")
    raise TestbedError(f"this process is in no cgroup v1 {controller} hierarchy; mount it at {CGROUP_ROOT}")


def create_cgroup(path: str | Path) -> None:
    Path(path).mkdir(parents=False, exist_ok=True)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise TestbedError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def set_cpu_limit(path: str | Path, cpu: float) -> None:
    """Limit the cgroup to ``cpu`` cores: quota = cpu x period (period 10 ms, at least 1 ms)."""
    p = Path(path)
    _write(p / "cpu.cfs_period_us", str(CFS_PERIOD_US))
    _write(p / "cpu.cfs_quota_us", str(max(1000, round(cpu * CFS_PERIOD_US))))


def set_cpu_weight(path: str | Path, shares: int) -> None:
    """Weight of the cgroup against its siblings on a busy host (``cpu.shares``; a process has 1024)."""
    _write(Path(path) / "cpu.shares", str(shares))


def set_memory_limit(path: str | Path, nbytes: int) -> None:
    """Limit the cgroup's memory (and memory+swap, where the kernel accounts swap) to ``nbytes``."""
    p = Path(path)
    _write(p / "memory.limit_in_bytes", str(nbytes))
    memsw = p / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        _write(memsw, str(nbytes))


def cgroup_pids(path: str | Path) -> list[int]:
    try:
        text = (Path(path) / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def remove_cgroup(path: str | Path, timeout: float = 5.0) -> None:
    """Kill the cgroup's processes (by PID; they are ours), then its child cgroups, then remove it."""
    p = Path(path)
    if not p.is_dir():
        return
    for child in [c for c in p.iterdir() if c.is_dir()]:
        remove_cgroup(child, timeout)
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in cgroup_pids(p) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            log.info("killing pid %d left in cgroup %s", pid, p)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TestbedError(f"processes {pids} in cgroup {p} did not exit; kill them, then run down again")
        time.sleep(0.05)
    while True:
        try:
            p.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TestbedError(f"cannot remove cgroup {p}: {exc.strerror}; run down again") from None
            time.sleep(0.05)  # killed processes leave the cgroup a moment after they exit
