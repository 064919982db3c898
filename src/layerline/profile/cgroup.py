"""CPU quotas for local agents: a cgroup v1 ``cpu`` controller group per device.

A device with ``cpu_quota: 0.5`` gets ``/sys/fs/cgroup/cpu/layerline-<name>/`` with
``cpu.cfs_quota_us = 0.5 × cpu.cfs_period_us``, and its agent's pid in ``cgroup.procs`` (threads created
later inherit it). This needs root and a mounted cgroup v1 cpu hierarchy; without them the quota is refused
with an EngineError, never silently ignored. ``LAYERLINE_CGROUP_CPU_ROOT`` points at another mount of
the hierarchy.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from layerline.errors import EngineError

__all__ = [
    "CGROUP_CPU_ROOT",
    "PERIOD_US",
    "apply_cpu_quota",
    "cgroup_cpu_root",
    "check_cpu_quota",
    "remove_cgroup",
]

CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000


def cgroup_cpu_root() -> Path:
    """Where the cgroup v1 cpu hierarchy is mounted (``LAYERLINE_CGROUP_CPU_ROOT`` overrides)."""
    return Path(os.environ.get("LAYERLINE_CGROUP_CPU_ROOT") or CGROUP_CPU_ROOT)


def check_cpu_quota(device: str, quota: float, root: Path | None = None) -> None:
    """Raise EngineError unless a quota can be enforced here for ``device``."""
    root = root or cgroup_cpu_root()
    why = None
    if quota * PERIOD_US < 1000:
        why = f"the smallest quota the kernel enforces is {1000 / PERIOD_US:g} of a core"
    elif not (root / "cpu.cfs_quota_us").is_file():
        why = f"there is no cgroup v1 cpu controller at {root} (cgroup v2-only hosts are not supported yet)"
    elif hasattr(os, "geteuid") and os.geteuid() != 0:
        why = "setting a cgroup cpu quota needs root"
    elif not os.access(root, os.W_OK):
        why = f"{root} is not writable"
    if why:
        raise EngineError(
            f"device {device!r} asks for cpu_quota={quota} but {why}; run the benchmark as root on a host "
            "with the cgroup v1 cpu controller, or remove cpu_quota from the cluster file"
        )


def apply_cpu_quota(device: str, quota: float, pid: int, root: Path | None = None) -> Path:
    """Put ``pid`` into ``layerline-<device>`` limited to ``quota`` cores; returns the group's folder."""
    root = root or cgroup_cpu_root()
    check_cpu_quota(device, quota, root)
    group = root / f"layerline-{device}"
    try:
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(round(quota * PERIOD_US)))
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        raise EngineError(
            f"cannot apply cpu_quota={quota} to device {device!r} in {group}: {exc}; remove cpu_quota from "
            "the cluster file or fix the cgroup permissions"
        ) from None
    return group


def remove_cgroup(group: Path) -> None:
    """Remove the group once its processes have exited (ignored if still busy or gone)."""
    with contextlib.suppress(OSError):
        group.rmdir()
