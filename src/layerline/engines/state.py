"""Where deployments keep their state: one directory per deployment under the user's run directory.

``$LAYERLINE_HOME`` (default ``~/.layerline``) / ``deployments`` / NAME / ``deployment.json``, the stage
models, the worker and gateway configs, and ``logs/``. The JSON is the deployment's single source of truth
for ``status`` and ``down``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerline.errors import EngineError, FormatError

__all__ = [
    "DeploymentState",
    "ProcessRecord",
    "deployment_dir",
    "deployments_root",
    "list_deployments",
    "load_state",
    "parse_role",
    "replica_role",
    "save_state",
    "state_lock",
    "update_state",
]

STATE_FILE = "deployment.json"
_ROLE = re.compile(r"stage(\d+)(?:\.r(\d+))?")
FORMAT = "layerline.deployment"
FORMAT_VERSION = 1


def deployments_root() -> Path:
    """The directory that holds one sub-directory per deployment."""
    home = os.environ.get("LAYERLINE_HOME") or str(Path.home() / ".layerline")
    return Path(home) / "deployments"


def deployment_dir(name: str) -> Path:
    return deployments_root() / name


@dataclass(frozen=True)
class ProcessRecord:
    """A process the engine started: its role (``stage0``, ``gateway``), pid, and log file."""

    role: str
    pid: int
    log: str
    port: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "pid": self.pid, "log": self.log, "port": self.port}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(str(data["role"]), int(data["pid"]), str(data["log"]), data.get("port"))

    @property
    def stage(self) -> int | None:
        """The stage this process serves (None for the gateway, redis, the autoscaler)."""
        parsed = parse_role(self.role)
        return None if parsed is None else parsed[0]


def replica_role(stage: int, slot: int) -> str:
    """The role of replica ``slot`` of ``stage`` in a Redis deployment: ``stage1.r0``."""
    return f"stage{stage}.r{slot}"


def parse_role(role: str) -> tuple[int, int] | None:
    """(stage, replica slot) of a stage worker's role (``stage1`` is slot 0, ``stage1.r2`` slot 2);
    None for other roles."""
    match = _ROLE.fullmatch(role)
    if match is None:
        return None
    return int(match[1]), int(match[2] or 0)


@dataclass(frozen=True)
class DeploymentState:
    """What ``deploy`` started; read back by ``status`` and ``down``."""

    name: str
    engine: str
    url: str
    host: str
    port: int
    sliced: str
    stages: tuple[dict[str, Any], ...]
    processes: tuple[ProcessRecord, ...]
    started_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "engine": self.engine,
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "sliced": self.sliced,
            "stages": list(self.stages),
            "processes": [p.to_json() for p in self.processes],
            "started_at": self.started_at,
            "extra": self.extra,
        }

    def replica_records(self, stage: int) -> list[ProcessRecord]:
        """The recorded workers of ``stage`` (running or not), oldest (lowest slot) first."""
        found = [(parse_role(p.role), p) for p in self.processes]
        mine = [(role[1], p) for role, p in found if role is not None and role[0] == stage]
        return [p for _slot, p in sorted(mine, key=lambda x: x[0])]

    def desired_replicas(self, stage: int) -> int:
        """How many replicas of ``stage`` the deployment should run (``deploy --replicas``, ``scale``)."""
        return int(self.stages[stage].get("replicas", 1))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeploymentState:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"not a layerline deployment state of version {FORMAT_VERSION} "
                f"(format={data.get('format')!r}, version={data.get('format_version')!r})"
            )
        return cls(
            name=data["name"],
            engine=data["engine"],
            url=data["url"],
            host=data["host"],
            port=int(data["port"]),
            sliced=data["sliced"],
            stages=tuple(data["stages"]),
            processes=tuple(ProcessRecord.from_json(p) for p in data["processes"]),
            started_at=float(data["started_at"]),
            extra=dict(data.get("extra", {})),
        )


def save_state(state: DeploymentState) -> Path:
    """Write the state atomically (write a temporary file, then rename)."""
    path = deployment_dir(state.name) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2))
    tmp.replace(path)
    return path


def load_state(name: str) -> DeploymentState:
    path = deployment_dir(name) / STATE_FILE
    try:
        return DeploymentState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FormatError(f"no deployment named {name!r} (no {path})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path} is damaged ({exc}); remove the directory {path.parent}") from exc


def list_deployments() -> list[str]:
    """Names of the deployments that have a state file, sorted."""
    root = deployments_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / STATE_FILE).is_file())


@contextlib.contextmanager
def state_lock(name: str, what: str = "state", timeout_s: float = 30.0) -> Iterator[None]:
    """Hold an exclusive lock of deployment ``name`` (``what``: ``state`` for read-modify-write of its
    state file, ``stage1`` for a whole scaling operation of stage 1) across processes (``flock``; the
    kernel releases it when its holder dies). EngineError when it is not free within ``timeout_s``."""
    directory = deployment_dir(name)
    if not directory.is_dir():
        raise FormatError(f"no deployment named {name!r} (no {directory})")
    with open(directory / f".{what}.lock", "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"deployment {name!r}: {what} is locked by another layerline process (a scale or "
                        f"the autoscaler) for more than {timeout_s:.0f} s; retry when it has finished"
                    ) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_state(name: str, change: Callable[[DeploymentState], DeploymentState]) -> DeploymentState:
    """Load deployment ``name``'s state, apply ``change`` and save the result atomically, holding the
    state lock (so that concurrent scalers never lose each other's updates); returns the new state."""
    with state_lock(name):
        state = change(load_state(name))
        save_state(state)
        return state
