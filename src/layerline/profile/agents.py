"""Starting profiling agents and talking to them (controller side).

An agent is launched per engine (``local``: a process of this machine, optionally in a cpu cgroup;
``testbed``: a process inside a testbed device), binds port 0 and reports its port through a file; waiting
for it, connecting and cleaning up are the same for every engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerline.errors import EngineError, TransportError
from layerline.profile.blocks import ChainPlan
from layerline.profile.cgroup import apply_cpu_quota, check_cpu_quota, remove_cgroup
from layerline.profile.cluster import DeviceSpec
from layerline.profile.wire import Channel, connect

if TYPE_CHECKING:
    from layerline.profile.overhead import HopOverhead
    from layerline.testbed.state import TestbedState

__all__ = [
    "AgentClient",
    "AgentHandle",
    "AgentLaunch",
    "await_agent",
    "discard_launch",
    "launch_agent",
    "start_agent",
    "start_local_agent",
    "stop_agent",
]

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

    def hop_overhead(self, repeats: int = 200, warmup: int = 20) -> HopOverhead:
        """Have the agent time a real stage hop on its device (see :mod:`layerline.profile.overhead`)."""
        from layerline.profile.overhead import HopOverhead

        reply = self.ch.call({"op": "hop_overhead", "repeats": repeats, "warmup": warmup})[0]
        return HopOverhead.from_json(reply["hop_overhead"])

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
    """A started agent: where it listens, its process and cgroup (local quota), its client."""

    device: DeviceSpec
    host: str
    port: int
    client: AgentClient
    proc: subprocess.Popen | None = None
    cgroup: Path | None = None
    log_path: Path | None = None


@dataclass
class AgentLaunch:
    """An agent process just spawned, not yet answering: where it will listen and report its port."""

    device: DeviceSpec
    host: str
    proc: subprocess.Popen
    port_file: Path
    log_path: Path
    cgroup: Path | None = None


def launch_agent(
    device: DeviceSpec,
    workdir: Path,
    cgroup_root: Path | None = None,
    testbed: TestbedState | None = None,
) -> AgentLaunch:
    """Spawn ``device``'s agent, listening on any free port of the device's address.

    ``local``: a process of this machine on 127.0.0.1, moved into a cpu cgroup when the device has a
    quota. ``testbed``: a process inside the testbed device (its cgroups and network namespace, through
    :func:`layerline.testbed.device_argv`) on the device's address; ``testbed`` defaults to the running one.
    The agent binds port 0 and writes the port it got to a file (robust against concurrent runs: nothing
    picks a port for it).
    """
    from layerline.engines.processes import spawn

    wrap = None
    if device.engine == "local":
        if device.cpu_quota is not None:
            check_cpu_quota(device.name, device.cpu_quota, cgroup_root)
        host = "127.0.0.1"
    elif device.engine == "testbed":
        from layerline.profile.testbed_devices import check_testbed_alive, running_testbed

        state = testbed or running_testbed()
        check_testbed_alive(state)
        record = state.device(device.name)
        if record.address != device.address:
            raise EngineError(
                f"device {device.name!r} has address {device.address} but testbed {state.testbed_id} gives "
                f"it {record.address}; re-read the cluster against the running testbed"
            )
        host = record.address
        wrap = _device_wrapper(state, device.name)
    else:
        raise EngineError(
            f"device {device.name!r}: engine {device.engine!r} cannot start agents; use 'local' or 'testbed'"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"agent-{device.name}.log"
    port_file = workdir / f"agent-{device.name}.port"
    port_file.unlink(missing_ok=True)
    args = ["-m", "layerline.profile.agent", "--listen", f"{host}:0", "--name", device.name]
    proc = spawn([*args, "--port-file", str(port_file)], log_path, wrap=wrap)
    launch = AgentLaunch(device, host, proc, port_file, log_path)
    if device.engine == "local" and device.cpu_quota is not None:
        try:
            launch.cgroup = apply_cpu_quota(device.name, device.cpu_quota, proc.pid, cgroup_root)
        except BaseException:
            discard_launch(launch)
            raise
    return launch


def _device_wrapper(state: TestbedState, device: str) -> Callable[[list[str]], list[str]]:
    from layerline.testbed import device_argv

    return lambda argv: device_argv(state, device, argv)


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def await_agent(
    launch: AgentLaunch, timeout_s: float = 30.0, request_timeout_s: float = 300.0
) -> AgentHandle:
    """Wait until the launched agent reports its port and accepts a connection; stop it on failure.

    EngineError naming the device (and the end of its log) when it exits or does not answer in time.
    """
    from layerline.engines.processes import tail

    device, proc = launch.device, launch.proc
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise EngineError(
                    f"the agent of device {device.name!r} exited with code {proc.returncode}: "
                    f"{tail(launch.log_path, 5) or '(no output)'}"
                )
            port = _read_port(launch.port_file)
            if port is not None:
                try:
                    client = AgentClient.connect(device.name, launch.host, port, timeout_s=request_timeout_s)
                    break
                except TransportError:
                    pass
            if time.monotonic() > deadline:
                where = f"{launch.host}:{port}" if port is not None else f"{launch.host} (no port reported)"
                raise EngineError(
                    f"the agent of device {device.name!r} did not answer on {where} within "
                    f"{timeout_s:.0f} s; its log: {tail(launch.log_path, 5) or '(empty)'}"
                )
            time.sleep(0.05)
    except BaseException:
        discard_launch(launch)
        raise
    launch.port_file.unlink(missing_ok=True)
    return AgentHandle(device, launch.host, port, client, proc, launch.cgroup, launch.log_path)


def discard_launch(launch: AgentLaunch) -> None:
    """Stop a launched agent that will not be used, and remove its cgroup."""
    from layerline.engines.processes import stop_processes

    stop_processes([launch.proc.pid])
    with contextlib.suppress(subprocess.TimeoutExpired):
        launch.proc.wait(1.0)
    if launch.cgroup is not None:
        remove_cgroup(launch.cgroup)
    launch.port_file.unlink(missing_ok=True)


def start_agent(
    device: DeviceSpec,
    workdir: Path,
    timeout_s: float = 30.0,
    request_timeout_s: float = 300.0,
    cgroup_root: Path | None = None,
    testbed: TestbedState | None = None,
) -> AgentHandle:
    """Start ``device``'s agent (:func:`launch_agent`) and wait until it answers (:func:`await_agent`).

    Raises EngineError naming the device when it cannot start or does not answer within ``timeout_s``.
    """
    return await_agent(launch_agent(device, workdir, cgroup_root, testbed), timeout_s, request_timeout_s)


def start_local_agent(
    device: DeviceSpec,
    workdir: Path,
    timeout_s: float = 30.0,
    request_timeout_s: float = 300.0,
    cgroup_root: Path | None = None,
) -> AgentHandle:
    """Start a ``local`` device's agent on a free loopback port (in its cpu cgroup if it has a quota)."""
    if device.engine != "local":
        raise EngineError(
            f"device {device.name!r}: engine {device.engine!r} is not local; use start_agent for it"
        )
    return start_agent(device, workdir, timeout_s, request_timeout_s, cgroup_root)


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
