"""The cluster description: which devices to profile and deploy on (``--cluster cluster.yaml``).

See ``docs/profile.md`` for the YAML layout. Without a file, :func:`default_cluster` is one device,
``local``: this machine, no CPU quota. Devices with ``engine: testbed`` are devices of the running emulated
testbed (:mod:`layerline.profile.testbed_devices`): their address and CPU quota come from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from layerline.errors import FormatError

if TYPE_CHECKING:
    from layerline.testbed.state import TestbedState

__all__ = ["ENGINES", "Cluster", "DeviceSpec", "default_cluster", "load_cluster", "parse_cluster"]

#: Engines a cluster file may name. Swarm nodes come from the swarm itself (`benchmark --engine swarm`,
#: :func:`layerline.engines.swarm.agents.swarm_cluster`), not from a file.
ENGINES = ("local", "testbed")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DEVICE_KEYS = {"name", "engine", "address", "labels", "cpu_quota", "memory_bytes"}
_FIX = "see docs/profile.md for the cluster file layout"


@dataclass(frozen=True)
class DeviceSpec:
    """One device: where its agent runs and the limits it has.

    ``cpu_quota``: fraction of one core (0.5 = half a core), None = unlimited. ``memory_bytes``: memory
    budget override, None = use the measured available memory.
    """

    name: str
    engine: str = "local"
    address: str = "127.0.0.1"
    labels: Mapping[str, str] = field(default_factory=dict)
    cpu_quota: float | None = None
    memory_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.engine,
            "address": self.address,
            "labels": dict(self.labels),
            "cpu_quota": self.cpu_quota,
            "memory_bytes": self.memory_bytes,
        }


@dataclass(frozen=True)
class Cluster:
    """An ordered set of devices with unique names.

    ``testbed``: the running testbed its ``engine: testbed`` devices belong to (None when it has none).
    """

    devices: tuple[DeviceSpec, ...]
    testbed: TestbedState | None = field(default=None, compare=False, repr=False)

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)


def default_cluster() -> Cluster:
    """One device, ``local``: this machine with no quota."""
    return Cluster((DeviceSpec("local"),))


def _where(node: Any, source: str) -> str:
    mark = getattr(node, "start_mark", None)
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _device(raw: Any, node: Any, index: int, source: str) -> DeviceSpec:
    at = _where(node, source)
    if not isinstance(raw, dict):
        raise FormatError(f"{at}: device #{index + 1} must be a mapping with at least 'name'; {_FIX}")
    unknown = sorted(set(raw) - _DEVICE_KEYS)
    if unknown:
        raise FormatError(
            f"{at}: device #{index + 1} has unknown key(s) {unknown}; allowed: {sorted(_DEVICE_KEYS)}"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise FormatError(f"{at}: device name {name!r} must be a non-empty string of [A-Za-z0-9_.-]")
    engine = raw.get("engine", "local")
    if engine not in ENGINES:
        hint = "; for swarm nodes use `layerline benchmark --engine swarm`" if engine == "swarm" else ""
        raise FormatError(
            f"{at}: device {name!r} has engine {engine!r}; supported engines: {list(ENGINES)}{hint}"
        )
    if engine == "testbed" and "cpu_quota" in raw:
        raise FormatError(
            f"{at}: device {name!r} runs on the testbed, whose fleet file sets its CPU (cpu:); remove "
            "cpu_quota from the cluster file (the device's quota is taken from the running testbed)"
        )
    address = raw.get("address", "127.0.0.1" if engine == "local" else None)
    if engine == "testbed" and address is None:
        address = ""  # filled in from the testbed
    if not isinstance(address, str) or (not address and engine == "local"):
        raise FormatError(f"{at}: device {name!r} address must be a host name or IP, got {address!r}")
    if engine == "local" and address not in ("127.0.0.1", "localhost"):
        raise FormatError(
            f"{at}: device {name!r} uses the local engine, whose agents listen on 127.0.0.1, "
            f"but its address is {address!r}; remove 'address' or set it to 127.0.0.1"
        )
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        raise FormatError(f"{at}: device {name!r} labels must be a mapping, got {labels!r}")
    quota = raw.get("cpu_quota")
    if quota is not None and (
        isinstance(quota, bool)
        or not isinstance(quota, int | float)
        or not math.isfinite(quota)
        or quota <= 0
    ):
        raise FormatError(
            f"{at}: device {name!r} cpu_quota must be a positive number of cores (0.5 = half a core) "
            f"or null, got {quota!r}"
        )
    mem = raw.get("memory_bytes")
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, int) or mem <= 0):
        raise FormatError(
            f"{at}: device {name!r} memory_bytes must be a positive integer or null, got {mem!r}"
        )
    return DeviceSpec(
        name=name,
        engine=engine,
        address="127.0.0.1" if engine == "local" else address,
        labels={str(k): str(v) for k, v in labels.items()},
        cpu_quota=None if quota is None else float(quota),
        memory_bytes=mem,
    )


def parse_cluster(text: str, source: str = "<cluster>", testbed: TestbedState | None = None) -> Cluster:
    """Parse cluster YAML; FormatError naming ``source`` and the line of the problem.

    ``engine: testbed`` devices are resolved against ``testbed`` (default: the running testbed, see
    :func:`layerline.profile.testbed_devices.running_testbed`).
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{source}:{mark.line + 1}" if mark is not None else source
        raise FormatError(f"{at}: not valid YAML ({getattr(exc, 'problem', exc)}); {_FIX}") from None
    if not isinstance(data, dict) or "devices" not in data:
        raise FormatError(f"{source}: a cluster file is a mapping with a 'devices' list; {_FIX}")
    unknown = sorted(set(data) - {"devices"})
    if unknown:
        raise FormatError(f"{source}: unknown top-level key(s) {unknown}; only 'devices' is allowed")
    raw_devices = data["devices"]
    dev_node = next((v for k, v in node.value if k.value == "devices"), None)
    if not isinstance(raw_devices, list) or not raw_devices:
        raise FormatError(f"{_where(dev_node, source)}: 'devices' must be a non-empty list; {_FIX}")
    nodes = dev_node.value if dev_node is not None else [None] * len(raw_devices)
    devices = [_device(raw, n, i, source) for i, (raw, n) in enumerate(zip(raw_devices, nodes, strict=True))]
    seen: set[str] = set()
    for d, n in zip(devices, nodes, strict=True):
        if d.name in seen:
            raise FormatError(f"{_where(n, source)}: device name {d.name!r} appears twice; names are unique")
        seen.add(d.name)
    return _resolve_testbed(devices, nodes, source, testbed)


def _resolve_testbed(
    devices: list[DeviceSpec], nodes: list[Any], source: str, testbed: TestbedState | None
) -> Cluster:
    """Fill in the address and quota of ``engine: testbed`` devices from the testbed."""
    on_testbed = [d.name for d in devices if d.engine == "testbed"]
    if not on_testbed:
        return Cluster(tuple(devices))
    local = [d.name for d in devices if d.engine != "testbed"]
    if local:
        raise FormatError(
            f"{source}: devices {on_testbed} use engine 'testbed' and {local} engine 'local'; a cluster "
            "uses one of them (the testbed's devices cannot reach agents on this machine's loopback): "
            "put the testbed's devices in a cluster file of their own"
        )
    from layerline.profile.testbed_devices import running_testbed, testbed_device

    state = testbed or running_testbed()
    resolved = [
        testbed_device(
            state,
            d.name,
            address=d.address or None,
            labels=d.labels,
            memory_bytes=d.memory_bytes,
            where=_where(n, source),
        )
        for d, n in zip(devices, nodes, strict=True)
    ]
    return Cluster(tuple(resolved), testbed=state)


def load_cluster(path: str | Path, testbed: TestbedState | None = None) -> Cluster:
    """Read a cluster YAML file (FormatError naming the file and line on a problem)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise FormatError(f"cannot read cluster file {p}: {exc.strerror or exc}; {_FIX}") from None
    return parse_cluster(text, str(p), testbed)
