"""The testbed's state file: everything ``up`` created, written BEFORE each thing is created.

``$LAYERLINE_HOME`` (default ``~/.layerline``) / ``testbed`` / ``testbed.json``. Because every namespace,
cgroup and daemon is recorded before it exists, ``down`` after a crash or a kill -9 removes exactly what
was (or may have been) made, and removing something already gone is not an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerline.testbed.errors import TestbedError
from layerline.testbed.spec import DeviceSpec, FleetSpec

__all__ = [
    "DaemonRecord",
    "DeviceRecord",
    "Resource",
    "TestbedState",
    "clear_state",
    "load_state",
    "process_start_time",
    "save_state",
    "testbed_dir",
]

STATE_FILE = "testbed.json"
FORMAT = "layerline.testbed"
FORMAT_VERSION = 1


def testbed_dir(home: str | Path | None = None) -> Path:
    """The directory holding the state file and daemon logs."""
    base = home or os.environ.get("LAYERLINE_HOME") or str(Path.home() / ".layerline")
    return Path(base) / "testbed"


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when no such process runs."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its parent's wait() is missing
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Resource:
    """One created thing: ``netns`` (name), ``link`` (host interface), ``cgroup`` (directory, removed with
    the cgroups beneath it), ``dir`` (a directory, removed with its contents after unmounting anything
    mounted beneath it) or ``process`` (role such as ``delayer:pi1`` or ``dockerd:pi1``, pid, start time)."""

    kind: str
    name: str
    pid: int | None = None
    start_time: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Resource:
        return cls(str(data["kind"]), str(data["name"]), data.get("pid"), data.get("start_time"))

    def is_running(self) -> bool:
        """For a process: it still runs and is the same process (not a reused PID)."""
        return self.pid is not None and process_start_time(self.pid) == self.start_time


@dataclass(frozen=True)
class DaemonRecord:
    """Where a ``swarm: true`` device's dockerd keeps its files.

    ``dir`` holds its config, data root, pidfile and log; ``run_dir`` its API socket and exec root (the
    same directory unless that path is too long for unix sockets); ``cgroups`` are the device's directories
    in every cgroup hierarchy, which the daemon joins (its containers go to ``docker/`` beneath them).
    """

    dir: str
    run_dir: str
    cgroups: tuple[str, ...]

    @property
    def socket(self) -> str:
        return str(Path(self.run_dir) / "docker.sock")

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` of the daemon: ``unix:///.../docker.sock``."""
        return f"unix://{self.socket}"

    @property
    def exec_root(self) -> str:
        return str(Path(self.run_dir) / "x")

    @property
    def data_root(self) -> str:
        return str(Path(self.dir) / "data")

    @property
    def pidfile(self) -> str:
        return str(Path(self.dir) / "docker.pid")

    @property
    def config_file(self) -> str:
        return str(Path(self.dir) / "daemon.json")

    @property
    def log(self) -> str:
        return str(Path(self.dir) / "dockerd.log")

    def to_json(self) -> dict[str, Any]:
        return {"dir": self.dir, "run_dir": self.run_dir, "cgroups": list(self.cgroups)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaemonRecord:
        return cls(str(data["dir"]), str(data["run_dir"]), tuple(str(c) for c in data["cgroups"]))


@dataclass(frozen=True)
class DeviceRecord:
    """Where a device lives: its address, network namespace, cgroup directories and (``swarm: true``) the
    files of its dockerd."""

    spec: DeviceSpec
    address: str
    netns: str
    cpu_cgroup: str
    memory_cgroup: str
    daemon: DaemonRecord | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "address": self.address,
            "netns": self.netns,
            "cpu_cgroup": self.cpu_cgroup,
            "memory_cgroup": self.memory_cgroup,
            "daemon": self.daemon.to_json() if self.daemon else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceRecord:
        daemon = data.get("daemon")
        return cls(
            DeviceSpec.from_json(data["spec"]),
            str(data["address"]),
            str(data["netns"]),
            str(data["cpu_cgroup"]),
            str(data["memory_cgroup"]),
            DaemonRecord.from_json(daemon) if daemon else None,
        )


@dataclass(frozen=True)
class TestbedState:
    """A testbed: its id (prefix of every name it made), fleet, devices and created resources."""

    __test__ = False

    testbed_id: str
    fleet: FleetSpec
    switch_netns: str
    subnet: str
    devices: tuple[DeviceRecord, ...]
    resources: tuple[Resource, ...] = ()
    phase: str = "starting"  # "starting" until every device is ready, then "up"
    created_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def device(self, name: str) -> DeviceRecord:
        for d in self.devices:
            if d.spec.name == name:
                return d
        names = ", ".join(d.spec.name for d in self.devices)
        raise TestbedError(f"no device {name!r} in testbed {self.testbed_id}; devices: {names}")

    def with_resource(self, resource: Resource) -> TestbedState:
        return dataclasses.replace(self, resources=(*self.resources, resource))

    def processes(self) -> list[Resource]:
        return [r for r in self.resources if r.kind == "process"]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "testbed_id": self.testbed_id,
            "fleet": self.fleet.to_json(),
            "switch_netns": self.switch_netns,
            "subnet": self.subnet,
            "devices": [d.to_json() for d in self.devices],
            "resources": [r.to_json() for r in self.resources],
            "phase": self.phase,
            "created_at": self.created_at,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TestbedState:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise TestbedError(
                f"testbed state is {data.get('format')!r} version {data.get('format_version')!r}, "
                f"not {FORMAT!r} version {FORMAT_VERSION}; it was written by another layerline version"
            )
        return cls(
            str(data["testbed_id"]),
            FleetSpec.from_json(data["fleet"]),
            str(data["switch_netns"]),
            str(data["subnet"]),
            tuple(DeviceRecord.from_json(d) for d in data["devices"]),
            tuple(Resource.from_json(r) for r in data["resources"]),
            str(data["phase"]),
            float(data["created_at"]),
            dict(data.get("extra") or {}),
        )


def save_state(state: TestbedState, home: str | Path | None = None) -> Path:
    """Write the state file atomically (write to a temporary file, fsync, rename)."""
    d = testbed_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    path = d / STATE_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(state.to_json(), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_state(home: str | Path | None = None) -> TestbedState | None:
    """The current testbed's state, or None when no testbed is up."""
    path = testbed_dir(home) / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return TestbedState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise TestbedError(
            f"testbed state {str(path)!r} is unreadable ({exc}); remove what it lists by hand, then delete it"
        ) from None


def clear_state(home: str | Path | None = None) -> None:
    """Delete the state file (after ``down`` removed everything it lists)."""
    (testbed_dir(home) / STATE_FILE).unlink(missing_ok=True)
