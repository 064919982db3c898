"""Which device each stage (and the gateway) of a deployment runs on, with what CPU limit and threads.

``place(target, cluster)`` checks that every device a plan names is in the cluster, picks each stage's
onnxruntime thread count with the benchmark's own rule (so deployed stages run the way their blocks were
profiled), and says where the gateway goes: on the plan's source device (requests come from there).

For a ``local`` device with ``cpu_quota`` the engine makes a cgroup v1 ``cpu`` group per deployment and
device, ``layerline-deploy-<deployment>-<device>``, with the same period as the benchmark's agents
(:data:`layerline.profile.cgroup.PERIOD_US`) and ``cfs_quota_us = cpu_quota × period``; the stage's worker
(and the gateway, on the source device) is moved into it right after it is spawned, before it has loaded
its model (``cgroup.procs`` moves every thread; threads created later inherit the group). A testbed
device (``engine: testbed``) needs no group: its processes run inside the device, whose cgroups limit them
(see :mod:`layerline.engines.on_testbed`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layerline.engines.stages import DeployTarget
from layerline.errors import EngineError, PlanError
from layerline.profile.cgroup import PERIOD_US, cgroup_cpu_root, check_cpu_quota
from layerline.profile.cluster import Cluster, DeviceSpec

__all__ = [
    "DevicePlacement",
    "StagePlacement",
    "benchmark_threads",
    "check_quotas",
    "create_cpu_group",
    "join_cpu_group",
    "place",
    "remove_cpu_group",
    "remove_cpu_groups",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class StagePlacement:
    """One stage: its device (with its limits) and its onnxruntime thread count."""

    device: DeviceSpec
    threads: int


@dataclass(frozen=True)
class DevicePlacement:
    """Every stage's device and threads, the gateway's device, and warnings to show the user."""

    stages: tuple[StagePlacement, ...]
    gateway: DeviceSpec
    warnings: tuple[str, ...] = ()

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        """The distinct devices used (stages, then the gateway's), in order."""
        seen: dict[str, DeviceSpec] = {}
        for d in [s.device for s in self.stages] + [self.gateway]:
            seen.setdefault(d.name, d)
        return tuple(seen.values())

    @property
    def quotas(self) -> dict[str, float]:
        """Device name → cpu_quota for the ``local`` devices used here that have one (the cpu groups this
        engine makes; a testbed device's quota is its own cgroup's)."""
        return {d.name: d.cpu_quota for d in self.devices if d.cpu_quota is not None and d.engine == "local"}

    @property
    def on_testbed(self) -> bool:
        """Whether the devices are a running testbed's (``engine: testbed``)."""
        return any(d.engine == "testbed" for d in self.devices)


def benchmark_threads(device: DeviceSpec, cores: int | None = None) -> int:
    """The thread count ``layerline benchmark`` times a device's blocks with when ``--threads`` is unset.

    ``ceil(cpu_quota)`` for a device with a quota, else all of this machine's cores (never more than the
    cores).
    """
    cores = cores or os.cpu_count() or 1
    wanted = max(1, math.ceil(device.cpu_quota)) if device.cpu_quota else cores
    return min(wanted, cores)


def place(
    target: DeployTarget,
    cluster: Cluster | None,
    threads: int | None = None,
    cores: int | None = None,
) -> DevicePlacement:
    """Resolve ``target``'s devices in ``cluster`` (None: devices are labels only, all on this machine).

    Threads per stage: ``threads`` when given; else the plan stage's own ``threads``; else, for a plan,
    :func:`benchmark_threads` of the stage's device (what its blocks were profiled with); else 1 (a
    balanced split of a sliced directory, which no benchmark priced).
    PlanError when the plan names a device the cluster does not have.
    """
    if threads is not None and threads < 1:
        raise PlanError(f"threads={threads}; use a positive number of onnxruntime threads per stage")
    warnings: list[str] = []
    if cluster is None:
        labels = sorted({d for d in target.devices if d != "local"})
        if labels:
            warnings.append(
                f"the plan names device(s) {', '.join(labels)} but no cluster was given, so the devices are "
                "labels only: every stage runs on this machine with no CPU limit; pass --cluster "
                "CLUSTER.yaml (the file given to `layerline benchmark`), or --testbed for a plan of the "
                "running testbed's devices, to run each stage on its device"
            )
        specs = [DeviceSpec(d) for d in target.devices]
        source = target.source_device or (target.devices[0] if target.devices else "local")
        gateway = DeviceSpec(source)
    else:
        unknown = [d for d in dict.fromkeys(target.devices) if d not in cluster.names]
        source = target.source_device or target.devices[0]
        if source not in cluster.names and source not in unknown:
            unknown.append(source)
        if unknown:
            raise PlanError(
                f"the plan names device(s) {', '.join(map(repr, unknown))} that the cluster does not have; "
                f"its devices are {', '.join(cluster.names)}; deploy with the cluster file the plan was "
                "profiled on, or plan again (`layerline configure`) from a profile of this cluster"
            )
        specs = [cluster.device(d) for d in target.devices]
        gateway = cluster.device(source)
    per_stage = list(target.threads) or [None] * len(specs)
    stages = []
    for spec, own in zip(specs, per_stage, strict=True):
        if threads is not None:
            n = threads
        elif own is not None:
            n = own
        elif target.source == "plan":
            n = benchmark_threads(spec, cores)
        else:
            n = 1
        stages.append(StagePlacement(spec, n))
    return DevicePlacement(tuple(stages), gateway, tuple(warnings))


def _group_path(deployment: str, device: str, root: Path | None) -> Path:
    name = _UNSAFE.sub("_", f"layerline-deploy-{deployment}-{device}")
    return (root or cgroup_cpu_root()) / name


def check_quotas(placement: DevicePlacement, root: Path | None = None) -> None:
    """EngineError (naming the device) unless every quota of ``placement`` can be enforced here."""
    for device, quota in placement.quotas.items():
        check_cpu_quota(device, quota, root or cgroup_cpu_root())


def create_cpu_group(deployment: str, device: str, quota: float, root: Path | None = None) -> Path:
    """Create (or reset) the deployment's cpu group for ``device`` limited to ``quota`` cores."""
    root = root or cgroup_cpu_root()
    check_cpu_quota(device, quota, root)
    group = _group_path(deployment, device, root)
    try:
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(round(quota * PERIOD_US)))
    except OSError as exc:
        raise EngineError(
            f"cannot create the cpu group {group} for device {device!r} (cpu_quota={quota}): {exc}; remove "
            "cpu_quota from the cluster file or fix the cgroup permissions"
        ) from None
    return group


def join_cpu_group(group: Path, pid: int) -> None:
    """Move process ``pid`` (all its threads) into ``group``."""
    try:
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        raise EngineError(f"cannot move process {pid} into the cpu group {group}: {exc}") from None


def remove_cpu_group(group: Path, timeout_s: float = 2.0) -> bool:
    """Remove ``group`` once its processes have left it; True when it is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError):
            try:
                group.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
                continue
        return not group.exists()


def remove_cpu_groups(groups: Sequence[str | Path]) -> list[str]:
    """Remove each group; the ones that could not be removed (still busy)."""
    return [str(g) for g in groups if not remove_cpu_group(Path(g))]
