"""Devices of the running emulated testbed as cluster devices (``engine: testbed``; docs/testbed.md).

A testbed device's address is its address on the testbed (``10.213.0.10``, ...), its ``cpu_quota`` is the
fleet's ``cpu`` (the testbed's cgroup enforces it; no extra layerline cgroup is made) and its memory is the
device's cgroup limit, which the agent reads as the device's memory. Processes run inside a device through
:func:`layerline.testbed.device_argv` (its cgroups, then its network namespace). ``LAYERLINE_HOME`` (or
``home``) decides which testbed is the running one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from layerline.errors import EngineError, FormatError
from layerline.profile.cluster import Cluster, DeviceSpec

if TYPE_CHECKING:
    from layerline.testbed.state import TestbedState

__all__ = [
    "TESTBED_ENGINE",
    "check_testbed_alive",
    "running_testbed",
    "testbed_cluster",
    "testbed_device",
    "testbed_gone",
]

TESTBED_ENGINE = "testbed"
_UP = "start one with `layerline testbed up FLEET.yaml`"


def running_testbed(home: str | Path | None = None) -> TestbedState:
    """The testbed that is up (``$LAYERLINE_HOME/testbed``); EngineError saying how to start one."""
    from layerline.testbed.state import load_state, testbed_dir

    state = load_state(home)
    if state is None:
        raise EngineError(
            f"no testbed is up (no state in {testbed_dir(home)}); {_UP} "
            "(LAYERLINE_HOME decides which testbed is used)"
        )
    if state.phase != "up":
        raise EngineError(
            f"testbed {state.testbed_id} is not up (phase {state.phase!r}: it is starting or failed to "
            "start); run `layerline testbed down`, then `layerline testbed up FLEET.yaml`"
        )
    check_testbed_alive(state)
    return state


def testbed_gone(state: TestbedState) -> list[str]:
    """What of the testbed's devices no longer exists (network namespaces, cgroups); empty when alive."""
    from layerline.testbed.netns import netns_exists

    missing = []
    for dev in state.devices:
        if not netns_exists(dev.netns):
            missing.append(f"network namespace {dev.netns}")
        for group in (dev.cpu_cgroup, dev.memory_cgroup):
            if not Path(group).is_dir():
                missing.append(f"cgroup {group}")
    return missing


def check_testbed_alive(state: TestbedState) -> None:
    """EngineError when the testbed was taken down (its device namespaces or cgroups are gone)."""
    missing = testbed_gone(state)
    if missing:
        raise EngineError(
            f"testbed {state.testbed_id} (fleet {state.fleet.name!r}) is gone: {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} no longer exist; {_UP} and run the command again"
        )


def _device_names(state: TestbedState) -> str:
    return ", ".join(d.spec.name for d in state.devices)


def testbed_device(
    state: TestbedState,
    name: str,
    *,
    address: str | None = None,
    labels: Mapping[str, str] | None = None,
    memory_bytes: int | None = None,
    where: str = "",
) -> DeviceSpec:
    """The cluster device for testbed device ``name``: its address, and the fleet's ``cpu`` as quota.

    ``address``, when given (a cluster file's), must be the device's testbed address. FormatError
    (prefixed with ``where``) when the device is not in the testbed or the address differs.
    """
    prefix = f"{where}: " if where else ""
    record = next((d for d in state.devices if d.spec.name == name), None)
    if record is None:
        raise FormatError(
            f"{prefix}device {name!r} is not a device of the running testbed {state.testbed_id} "
            f"(fleet {state.fleet.name!r}: {_device_names(state)}); use one of those names, or bring up "
            f"the fleet that has it: `layerline testbed down`, then `layerline testbed up FLEET.yaml`"
        )
    if address is not None and address != record.address:
        raise FormatError(
            f"{prefix}device {name!r} has address {address!r} but its testbed address is "
            f"{record.address}; remove 'address' (it is taken from the testbed) or set it to {record.address}"
        )
    return DeviceSpec(
        name=name,
        engine=TESTBED_ENGINE,
        address=record.address,
        labels=dict(labels or {}),
        cpu_quota=record.spec.cpu,
        memory_bytes=memory_bytes,
    )


def testbed_cluster(state: TestbedState) -> Cluster:
    """Every device of the testbed, in fleet order, as a cluster (``benchmark --testbed``)."""
    return Cluster(tuple(testbed_device(state, d.spec.name) for d in state.devices), testbed=state)
