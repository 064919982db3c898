"""The fleet's Docker Swarm: the first ``swarm: true`` device is the manager, the others join as workers.

Also the public helpers around it: :func:`docker_host` (a device daemon's ``DOCKER_HOST``),
:func:`swarm_manager` and :func:`load_image`, which copies an image into every device daemon with
``docker save | docker load`` (no registry is needed, nor reachable from the devices).
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from layerline.testbed.errors import TestbedError
from layerline.testbed.state import DeviceRecord, TestbedState

__all__ = [
    "SWARM_PORT",
    "NodeInfo",
    "docker",
    "docker_host",
    "form_swarm",
    "load_image",
    "nodes",
    "swarm_devices",
    "swarm_manager",
]

log = logging.getLogger(__name__)

SWARM_PORT = 2377
_UP_AGAIN = (
    "set swarm: true for it in the fleet file, then `layerline testbed down` and `testbed up FLEET.yaml`"
)


def docker(host: str | None, args: Sequence[str], timeout: float = 60.0, check: bool = True) -> str:
    """Run ``docker [-H host] ARGS``; its stdout. TestbedError with docker's message on failure."""
    argv = ["docker", *(["-H", host] if host else []), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise TestbedError("the docker command is not installed; apt-get install -y docker.io") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{' '.join(argv[:6])} ...` did not finish in {timeout:g} s") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()[-1500:]
        raise TestbedError(f"`{' '.join(argv[:6])}` failed (exit {proc.returncode}): {err}")
    return proc.stdout


def swarm_devices(state: TestbedState) -> list[DeviceRecord]:
    """The devices that run a dockerd, in fleet order."""
    return [d for d in state.devices if d.daemon is not None]


def docker_host(state: TestbedState, device: str) -> str:
    """``unix:///.../docker.sock`` of ``device``'s dockerd (for ``docker -H`` or ``DOCKER_HOST``)."""
    dev = state.device(device)
    if dev.daemon is None:
        raise TestbedError(f"device {device!r} of testbed {state.testbed_id} runs no dockerd; {_UP_AGAIN}")
    return dev.daemon.host


def swarm_manager(state: TestbedState) -> str:
    """The name of the device whose dockerd manages the swarm (the first ``swarm: true`` device)."""
    devs = swarm_devices(state)
    if not devs:
        raise TestbedError(
            f"testbed {state.testbed_id} (fleet {state.fleet.name!r}) has no swarm: true device; {_UP_AGAIN}"
        )
    return devs[0].spec.name


@dataclass(frozen=True)
class NodeInfo:
    """A swarm node as the manager sees it (``docker node ls``)."""

    hostname: str
    node_id: str
    state: str  # Ready, Down, Unknown
    availability: str  # Active, Pause, Drain
    manager_status: str  # Leader, Reachable, "" for a worker

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def nodes(state: TestbedState, timeout: float = 10.0) -> dict[str, NodeInfo]:
    """Swarm nodes by hostname (= device name); TestbedError when the manager does not answer."""
    mgr = docker_host(state, swarm_manager(state))
    out = docker(mgr, ["node", "ls", "--format", "{{json .}}"], timeout=timeout)
    found = {}
    for line in out.splitlines():
        if line.strip():
            row = json.loads(line)
            info = NodeInfo(
                row.get("Hostname", ""),
                row.get("ID", ""),
                row.get("Status", ""),
                row.get("Availability", ""),
                row.get("ManagerStatus", ""),
            )
            found[info.hostname] = info
    return found


def form_swarm(state: TestbedState, timeout: float = 60.0) -> None:
    """``swarm init`` on the manager, ``swarm join`` on the others, then wait until every node is Ready."""
    devs = swarm_devices(state)
    mgr = devs[0]
    assert mgr.daemon is not None
    mgr_host = mgr.daemon.host
    docker(
        mgr_host,
        ["swarm", "init", "--advertise-addr", mgr.address, "--listen-addr", f"{mgr.address}:{SWARM_PORT}"],
    )
    token = docker(mgr_host, ["swarm", "join-token", "-q", "worker"]).strip()
    for dev in devs[1:]:
        assert dev.daemon is not None
        docker(
            dev.daemon.host,
            [
                *("swarm", "join", "--token", token),
                *("--advertise-addr", dev.address, "--listen-addr", f"{dev.address}:{SWARM_PORT}"),
                f"{mgr.address}:{SWARM_PORT}",
            ],
        )
    wanted = {d.spec.name for d in devs}
    deadline = time.monotonic() + timeout
    while True:
        found = nodes(state)
        ready = {name for name, n in found.items() if n.state == "Ready"}
        if wanted <= ready:
            return
        if time.monotonic() > deadline:
            raise TestbedError(
                f"swarm nodes {sorted(wanted - ready)} were not Ready after {timeout:g} s "
                f"(manager {mgr.spec.name} sees {[(n.hostname, n.state) for n in found.values()]}); "
                f"see the dockerd logs under {mgr.daemon.dir}/.."
            )
        time.sleep(0.2)


def _image_id(host: str | None, tag: str) -> str | None:
    out = docker(host, ["image", "inspect", "--format", "{{.Id}}", tag], check=False, timeout=30)
    return out.strip() or None


def load_image(
    state: TestbedState, tag: str, source_docker_host: str | None = None, timeout: float = 600.0
) -> list[str]:
    """Copy image ``tag`` from ``source_docker_host`` (default: the host's own docker daemon) into every
    device dockerd that lacks it (one ``docker save`` streamed into parallel ``docker load``\\ s).

    Returns the devices it was loaded into (those that had the same image already are skipped).
    """
    devs = swarm_devices(state)
    if not devs:
        swarm_manager(state)  # raises with the fix
    source_id = _image_id(source_docker_host, tag)
    if source_id is None:
        where = source_docker_host or "the host's docker daemon"
        raise TestbedError(
            f"image {tag!r} is not in {where}; build or pull it there first, "
            "or pass the docker host that has it"
        )
    targets = [
        d
        for d in devs
        if d.daemon and d.daemon.host != source_docker_host and _image_id(d.daemon.host, tag) != source_id
    ]
    if targets:
        t0 = time.monotonic()
        with contextlib.ExitStack() as stack:
            _copy_image(stack, tag, source_docker_host, targets, timeout)
        log.info("loaded %s into %d devices in %.1f s", tag, len(targets), time.monotonic() - t0)
    return [d.spec.name for d in targets]


def _popen(stack: contextlib.ExitStack, argv: list[str], **kw: Any) -> tuple[subprocess.Popen, IO[bytes]]:
    """Start a process whose stderr goes to a temporary file; the stack kills and reaps it."""
    err = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - the stack closes it
    proc = subprocess.Popen(argv, stderr=err, **kw)
    stack.callback(_reap, proc)
    return proc, err


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _tail(err: IO[bytes], n: int = 1000) -> str:
    err.seek(0)
    return err.read().decode(errors="replace").strip()[-n:]


def _copy_image(
    stack: contextlib.ExitStack, tag: str, source: str | None, targets: list[DeviceRecord], timeout: float
) -> None:
    save, save_err = _popen(
        stack, ["docker", *(["-H", source] if source else []), "save", tag], stdout=subprocess.PIPE
    )
    loads = []
    for dev in targets:
        assert dev.daemon is not None
        argv = ["docker", "-H", dev.daemon.host, "load", "-q"]
        loads.append((dev, *_popen(stack, argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)))
    _tee(save, [p for _, p, _ in loads], timeout)
    if save.wait(timeout=timeout) != 0:
        raise TestbedError(f"`docker save {tag}` failed: {_tail(save_err)}")
    failed = [f"{dev.spec.name}: {_tail(err)}" for dev, proc, err in loads if proc.wait(timeout=timeout) != 0]
    if failed:
        raise TestbedError(f"`docker load` of {tag!r} failed on " + "; ".join(failed))


def _tee(source: subprocess.Popen, sinks: list[subprocess.Popen], timeout: float) -> None:
    """Copy the source's stdout into every sink's stdin, then close them."""
    assert source.stdout is not None
    deadline = time.monotonic() + timeout
    open_sinks = [s for s in sinks if s.stdin is not None]
    while chunk := source.stdout.read(1 << 20):
        if time.monotonic() > deadline:
            raise TestbedError(f"copying the image took more than {timeout:g} s")
        for sink in list(open_sinks):
            try:
                sink.stdin.write(chunk)  # type: ignore[union-attr]
            except BrokenPipeError:
                open_sinks.remove(sink)  # that load failed; its exit status says why
    for sink in sinks:
        with contextlib.suppress(BrokenPipeError, OSError):
            sink.stdin.close()  # type: ignore[union-attr]
