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
from dataclasses import dataclass
from pathlib import Path

from layerline.testbed.errors import TestbedError
from layerline.testbed.host import CGROUP_ROOT

__all__ = [
    "CFS_PERIOD_US",
    "Hierarchy",
    "cgroup_pids",
    "create_cgroup",
    "hierarchies",
    "own_cgroup",
    "remove_cgroup",
    "set_cpu_limit",
    "set_cpu_weight",
    "set_memory_limit",
    "thaw_tree",
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


# what a cgroup v1 mount's super options may name besides flags (xattr, clone_children, ...)
_CONTROLLERS = {
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "net_cls", "net_prio",
    "perf_event", "hugetlb", "rdma", "misc",
}  # fmt: skip


@dataclass(frozen=True)
class Hierarchy:
    """One cgroup hierarchy mounted under /sys/fs/cgroup: where, its type (``cgroup`` for v1, ``cgroup2``),
    its controllers and ``name=`` (v1), and this process's cgroup directory in it."""

    mountpoint: Path
    fstype: str
    options: tuple[str, ...]
    own: Path

    def mount_options(self) -> str:
        """The ``-o`` value that mounts this hierarchy again (a name-only one needs ``none``)."""
        if any(o in _CONTROLLERS for o in self.options):
            return ",".join(self.options)
        return ",".join(("none", *self.options))


def hierarchies() -> list[Hierarchy]:
    """Every cgroup v1 and v2 hierarchy mounted under /sys/fs/cgroup, with this process's cgroup in it."""
    own: dict[frozenset[str] | None, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        num, controllers, path = line.split(":", 2)
        own[None if num == "0" and not controllers else frozenset(controllers.split(","))] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        root, point = fields[3], Path(fields[4])
        if CGROUP_ROOT not in point.parents:
            continue
        opts = tuple(o for o in tail[2].split(",") if o in _CONTROLLERS or o.startswith("name="))
        path = own.get(frozenset(opts) if tail[0] == "cgroup" else None)
        if path is None:
            continue
        rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
        found.append(Hierarchy(point, tail[0], opts, point / ("" if rel == "." else rel)))
    return found


def create_cgroup(path: str | Path) -> None:
    """Make a cgroup directory; in a cpuset hierarchy copy the parent's CPUs and memory nodes (a new
    cpuset is empty, and no process can join it until they are set)."""
    p = Path(path)
    try:
        p.mkdir(parents=False, exist_ok=True)
    except OSError as exc:
        raise TestbedError(
            f"cannot create cgroup {p}: {exc.strerror}; the testbed needs it writable"
        ) from None
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = p / name
        if mine.exists() and not mine.read_text().strip():
            _write(mine, (p.parent / name).read_text().strip())


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


def _thaw(path: Path) -> None:
    """A frozen cgroup's processes (``docker pause``) cannot die of SIGKILL: thaw it first."""
    for name, thawed in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
        with contextlib.suppress(OSError):
            if (path / name).read_text().strip() not in (thawed, ""):
                (path / name).write_text(thawed)


def thaw_tree(path: str | Path) -> None:
    """Thaw a cgroup and all cgroups beneath it (before killing their processes from another hierarchy)."""
    p = Path(path)
    if p.is_dir():
        _thaw(p)
        for child in [c for c in p.iterdir() if c.is_dir()]:
            thaw_tree(child)


def remove_cgroup(path: str | Path, timeout: float = 5.0) -> None:
    """Kill the cgroup's processes (by PID; they are ours), then its child cgroups, then remove it."""
    p = Path(path)
    if not p.is_dir():
        return
    _thaw(p)
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
