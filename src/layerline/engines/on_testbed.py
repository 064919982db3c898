"""The local engine on the emulated testbed: stage workers and the gateway inside the testbed's devices.

When a deployment's devices are a running testbed's (``engine: testbed``, docs/local-engine.md), every
stage worker runs inside its device through :func:`layerline.testbed.device_argv` (the device's cgroups,
then its network namespace; the final ``exec`` keeps the pid, so ``down`` stops the worker itself) and
listens on the device's address; each next hop is the next device's address, so stage-to-stage traffic
crosses the devices' shaped links. The gateway runs inside the source device, on its address: the host
reaches it through its port on the fleet's bridge (``10.213.0.1``).

Ports: each device has its own network namespace, hence its own port space; a port is taken from the
range below the kernel's ephemeral range at random and checked by connecting to it from the host (a
refused connection means nothing listens there).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerline.engines import processes
from layerline.engines.configs import Endpoints
from layerline.engines.placement import DevicePlacement
from layerline.errors import DeploymentExists, EngineError

if TYPE_CHECKING:
    from layerline.profile.cluster import Cluster
    from layerline.testbed.state import TestbedState

__all__ = [
    "check_gateway_port",
    "device_endpoints",
    "free_port_on",
    "gateway_settings",
    "testbed_for",
    "testbed_problem",
    "testbed_record",
    "wrapper",
]

_LOW = 10000


def testbed_for(placed: DevicePlacement, cluster: Cluster | None) -> TestbedState | None:
    """The running testbed the placement's devices belong to, None when they are ``local`` devices.

    EngineError when local and testbed devices are mixed, or when the testbed is gone (taken down since
    the cluster was read).
    """
    from layerline.profile.testbed_devices import check_testbed_alive, running_testbed

    if not placed.on_testbed:
        return None
    local = [d.name for d in placed.devices if d.engine != "testbed"]
    if local:
        raise EngineError(
            f"devices {local} are not testbed devices but the others are; a deployment on the testbed runs "
            "every stage and the gateway on testbed devices (plan from a profile of `benchmark --testbed`)"
        )
    state = (cluster.testbed if cluster is not None else None) or running_testbed()
    check_testbed_alive(state)
    for d in placed.devices:
        record = state.device(d.name)
        if record.address != d.address:
            raise EngineError(
                f"device {d.name!r} has address {d.address} in the cluster but {record.address} in testbed "
                f"{state.testbed_id}; read the cluster again against the running testbed"
            )
    return state


def gateway_settings(settings: Any, placed: DevicePlacement) -> Any:
    """``settings`` with the gateway on the source device's address (where the host reaches it).

    EngineError when ``settings.host`` names another address (only the loopback default, the device's
    address or 0.0.0.0 make sense inside the device).
    """
    address = placed.gateway.address
    if settings.host in ("127.0.0.1", "localhost", address):
        return replace(settings, host=address)
    if settings.host == "0.0.0.0":
        return settings
    raise EngineError(
        f"the gateway runs inside testbed device {placed.gateway.name!r}, whose address is {address}, so it "
        f"cannot listen on {settings.host}; drop --host (it listens on {address})"
    )


def _ephemeral_low() -> int:
    """The bottom of the kernel's ephemeral port range (listeners go below it, away from outgoing ports)."""
    try:
        return max(int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]), _LOW + 1000)
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_on(address: str, taken: set[int] | None = None, attempts: int = 100) -> int:
    """A port nothing listens on at ``address`` (a testbed device's), not in ``taken``."""
    high = _ephemeral_low() - 1
    taken = taken or set()
    for _ in range(attempts):
        port = random.randint(_LOW, high)
        if port not in taken and not processes.port_open(address, port, timeout_s=2.0):
            return port
    raise EngineError(f"found no free port on {address} in {attempts} tries; is the testbed device alive?")


def device_endpoints(placed: DevicePlacement, gateway_port: int) -> Endpoints:
    """A free port on each stage's device address, and one for the gateway's result listener."""
    taken: dict[str, set[int]] = {placed.gateway.address: {gateway_port}}
    stages = []
    for stage in placed.stages:
        address = stage.device.address
        port = free_port_on(address, taken.setdefault(address, set()))
        taken[address].add(port)
        stages.append((address, port))
    address = placed.gateway.address
    result = (address, free_port_on(address, taken.setdefault(address, set())))
    return Endpoints(tuple(stages), result)


def check_gateway_port(settings: Any, placed: DevicePlacement) -> None:
    """DeploymentExists when the gateway's port is taken inside the source device."""
    if processes.port_open(placed.gateway.address, settings.port, timeout_s=2.0):
        raise DeploymentExists(
            f"port {settings.port} on testbed device {placed.gateway.name!r} ({placed.gateway.address}) is "
            "already in use (another deployment or program); stop it (`layerline status`) or pass --port"
        )


def wrapper(state: TestbedState, device: str) -> Callable[[list[str]], list[str]]:
    """Turns a command into the argv that runs it inside ``device`` (for :func:`processes.spawn`)."""
    from layerline.testbed import device_argv

    return lambda argv: device_argv(state, device, argv)


def testbed_record(state: TestbedState, placed: DevicePlacement) -> dict[str, Any]:
    """What ``deployment.json`` keeps of the testbed (``extra.testbed``): its id and the devices used."""
    devices = {}
    for d in placed.devices:
        record = state.device(d.name)
        devices[d.name] = {
            "address": record.address,
            "netns": record.netns,
            "cpu_cgroup": record.cpu_cgroup,
            "memory_cgroup": record.memory_cgroup,
        }
    return {"id": state.testbed_id, "fleet": state.fleet.name, "devices": devices}


def testbed_problem(record: dict[str, Any] | None) -> str:
    """'' while the deployment's testbed devices exist, else why the deployment cannot be running."""
    from layerline.testbed.netns import netns_exists

    if not record:
        return ""
    gone = [
        name
        for name, dev in dict(record.get("devices") or {}).items()
        if not netns_exists(str(dev.get("netns"))) or not Path(str(dev.get("cpu_cgroup"))).is_dir()
    ]
    if not gone:
        return ""
    return (
        f"testbed {record.get('id')} was taken down (devices {', '.join(gone)} are gone) and its processes "
        "with it; remove this deployment with `layerline down`, bring the fleet up again "
        "(`layerline testbed up FLEET.yaml`) and deploy again"
    )
