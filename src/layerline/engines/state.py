"""Where deployments keep their state: one directory per deployment under the user's run directory.

``$LAYERLINE_HOME`` (default ``~/.layerline``) / ``deployments`` / NAME / ``deployment.json``, the stage
models, the worker and gateway configs, and ``logs/``. The JSON is the deployment's single source of truth
for ``status`` and ``down``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerline.errors import FormatError

__all__ = [
    "DeploymentState",
    "ProcessRecord",
    "deployment_dir",
    "deployments_root",
    "list_deployments",
    "load_state",
    "save_state",
]

STATE_FILE = "deployment.json"
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
