"""A thin wrapper around the ``docker`` command line (the engine needs nothing the CLI does not offer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from layerline.errors import EngineError

__all__ = ["DockerCli"]


class DockerCli:
    """Runs ``docker [-H host] ARGS``; errors become :class:`EngineError` with docker's own message."""

    def __init__(self, host: str | None = None, binary: str | None = None) -> None:
        found = binary or shutil.which("docker")
        if not found:
            raise EngineError(
                "the docker command is not installed; install docker (e.g. apt-get install docker.io)"
            )
        self.binary = found
        self.host = host

    def argv(self, args: Sequence[str]) -> list[str]:
        return [self.binary, *(["-H", self.host] if self.host else []), *args]

    def run(
        self,
        args: Sequence[str],
        timeout_s: float = 120.0,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        check: bool = True,
    ) -> str:
        """Run one docker command; its stdout (raises EngineError on a non-zero exit when ``check``)."""
        argv = self.argv(args)
        try:
            proc = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                timeout=timeout_s,
                env={**os.environ, **(env or {})},
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EngineError(
                f"`docker {' '.join(args[:3])} ...` did not finish within {timeout_s:.0f} s"
            ) from exc
        out = proc.stdout.decode(errors="replace")
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip() or out.strip()
            raise EngineError(
                f"`docker {' '.join(args[:3])} ...` failed (exit {proc.returncode}): {err[-2000:]}"
            )
        return out

    def json_lines(self, args: Sequence[str]) -> list[dict[str, Any]]:
        """Run a command with ``--format '{{json .}}'`` and parse one JSON object per line."""
        out = self.run([*args, "--format", "{{json .}}"])
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def swarm_node(self) -> tuple[str, bool]:
        """This daemon's swarm node ID and whether it is a manager; EngineError when not in a swarm."""
        info = json.loads(self.run(["info", "--format", "{{json .Swarm}}"]))
        node, state = info.get("NodeID") or "", info.get("LocalNodeState")
        if state != "active" or not node:
            raise EngineError(
                f"this docker daemon is not part of a swarm (state {state!r}); "
                "run `docker swarm init --advertise-addr ADDR` first"
            )
        return node, bool(info.get("ControlAvailable"))
