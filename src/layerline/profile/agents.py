"""Starting local profiling agents and talking to them (controller side)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.errors import EngineError, TransportError
from layerline.profile.blocks import ChainPlan
from layerline.profile.cgroup import apply_cpu_quota, check_cpu_quota, remove_cgroup
from layerline.profile.cluster import DeviceSpec
from layerline.profile.wire import Channel, connect

__all__ = ["AgentClient", "AgentHandle", "start_local_agent", "stop_agent"]

log = logging.getLogger(__name__)


class AgentClient:
    """The controller's connection to one agent."""

    def __init__(self, channel: Channel, name: str) -> None:
        self.ch = channel
        self.name = name

    @classmethod
    def connect(cls, name: str, host: str, port: int, timeout_s: float = 60.0) -> AgentClient:
        return cls(connect(host, port, timeout_s, peer=f"agent of device {name!r} ({host}:{port})"), name)

    def hello(self) -> dict[str, Any]:
        return self.ch.call({"op": "hello"})[0]

    def load_block(self, index: int, source: bytes | str) -> None:
        """Send a block's ONNX bytes (size + sha256 checked by the agent), or a path on the agent's host."""
        if isinstance(source, str):
            self.ch.call({"op": "load_block", "block": index, "path": source})
        else:
            digest = hashlib.sha256(source).hexdigest()
            self.ch.call({"op": "load_block", "block": index, "size": len(source), "sha256": digest}, source)

    def profile(self, plan: ChainPlan, progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """Run the chain on the agent; ``progress(done, total)`` as it reports."""
        self.ch.send({"op": "profile", "plan": plan.to_json()})
        while True:
            reply, _ = self.ch.recv()
            if "error" in reply:
                raise TransportError(f"{self.ch.peer}: {reply['error']}")
            if "progress" in reply:
                if progress is not None:
                    progress(int(reply["progress"]), int(reply["total"]))
                continue
            return list(reply["results"])

    def link_test(self, host: str, port: int, pings: int, sizes: list[int], repeats: int) -> dict[str, Any]:
        """Ask this agent to measure its link to the agent listening at ``host:port``."""
        msg = {
            "op": "link_test",
            "host": host,
            "port": port,
            "pings": pings,
            "sizes": sizes,
            "repeats": repeats,
        }
        return self.ch.call(msg)[0]

    def shutdown(self) -> None:
        with contextlib.suppress(TransportError):
            self.ch.call({"op": "shutdown"})
        self.ch.close()


@dataclass
class AgentHandle:
    """A started agent: where it listens, its process (local engine) and cgroup, its client."""

    device: DeviceSpec
    host: str
    port: int
    client: AgentClient
    proc: subprocess.Popen | None = None
    cgroup: Path | None = None
    log_path: Path | None = None


def start_local_agent(
    device: DeviceSpec,
    workdir: Path,
    timeout_s: float = 30.0,
    request_timeout_s: float = 300.0,
    cgroup_root: Path | None = None,
) -> AgentHandle:
    """Start ``device``'s agent on a free loopback port (in its cpu cgroup if it has a quota).

    Raises EngineError naming the device when it cannot start or does not answer within ``timeout_s``.
    """
    from layerline.engines.processes import free_port, spawn, stop_processes, tail

    if device.engine != "local":
        raise EngineError(
            f"device {device.name!r}: engine {device.engine!r} cannot start agents; use 'local'"
        )
    if device.cpu_quota is not None:
        check_cpu_quota(device.name, device.cpu_quota, cgroup_root)
    port = free_port("127.0.0.1")
    log_path = workdir / f"agent-{device.name}.log"
    proc = spawn(
        ["-m", "layerline.profile.agent", "--listen", f"127.0.0.1:{port}", "--name", device.name], log_path
    )
    cgroup = None
    try:
        if device.cpu_quota is not None:
            cgroup = apply_cpu_quota(device.name, device.cpu_quota, proc.pid, cgroup_root)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise EngineError(
                    f"the agent of device {device.name!r} exited with code {proc.returncode}: "
                    f"{tail(log_path, 5) or '(no output)'}"
                )
            try:
                client = AgentClient.connect(device.name, "127.0.0.1", port, timeout_s=request_timeout_s)
                break
            except TransportError:
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the agent of device {device.name!r} did not answer on 127.0.0.1:{port} within "
                        f"{timeout_s:.0f} s; its log: {tail(log_path, 5) or '(empty)'}"
                    ) from None
                time.sleep(0.05)
    except BaseException:
        stop_processes([proc.pid])
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)
        if cgroup is not None:
            remove_cgroup(cgroup)
        raise
    return AgentHandle(device, "127.0.0.1", port, client, proc, cgroup, log_path)


def stop_agent(handle: AgentHandle) -> None:
    """Ask the agent to exit, then make sure its process is gone and its cgroup removed."""
    from layerline.engines.processes import stop_processes

    handle.client.shutdown()
    if handle.proc is not None:
        try:
            handle.proc.wait(3.0)
        except subprocess.TimeoutExpired:
            stop_processes([handle.proc.pid])
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.proc.wait(2.0)
    if handle.cgroup is not None:
        remove_cgroup(handle.cgroup)
