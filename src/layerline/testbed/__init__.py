"""An emulated fleet of devices on one Linux host: network namespaces, shaped links, cgroup CPU/memory limits.

See ``docs/testbed.md``. Needs root and cgroup v1; ``layerline testbed up fleet.yaml`` is the entry point.
"""

from __future__ import annotations

from layerline.testbed.errors import TestbedError
from layerline.testbed.lifecycle import DeviceStatus, TestbedStatus, device_argv, down, status, up
from layerline.testbed.spec import DeviceSpec, FleetSpec, LinkSpec, load_fleet
from layerline.testbed.state import TestbedState, load_state

__all__ = [
    "DeviceSpec",
    "DeviceStatus",
    "FleetSpec",
    "LinkSpec",
    "TestbedError",
    "TestbedState",
    "TestbedStatus",
    "device_argv",
    "down",
    "load_fleet",
    "load_state",
    "status",
    "up",
]
