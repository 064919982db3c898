"""An emulated fleet of devices on one Linux host: network namespaces, shaped links, cgroup CPU/memory limits,
and optionally one dockerd per device joined into a Docker Swarm.

See ``docs/testbed.md``. Needs root and cgroup v1; ``layerline testbed up fleet.yaml`` is the entry point.
"""

from __future__ import annotations

from layerline.testbed.errors import TestbedError
from layerline.testbed.lifecycle import device_argv, down, up
from layerline.testbed.spec import DeviceSpec, FleetSpec, LinkSpec, load_fleet
from layerline.testbed.state import TestbedState, load_state
from layerline.testbed.status import DeviceStatus, TestbedStatus, status
from layerline.testbed.swarm import docker_host, load_image, swarm_manager

__all__ = [
    "DeviceSpec",
    "DeviceStatus",
    "FleetSpec",
    "LinkSpec",
    "TestbedError",
    "TestbedState",
    "TestbedStatus",
    "device_argv",
    "docker_host",
    "down",
    "load_fleet",
    "load_image",
    "load_state",
    "status",
    "swarm_manager",
    "up",
]
