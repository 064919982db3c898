"""A private dockerd in a single-node swarm for the swarm engine's tests (needs root, dockerd, debootstrap).

The daemon has its own data root, exec root, socket and pidfile in a temporary directory, overlay2 storage
where the filesystem allows (else vfs), no iptables and no bridge; everything is stopped and removed at the
end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from layerline.engines.swarm.docker import DockerCli
from layerline.errors import EngineError
from layerline.testbed.dockerd import storage_driver

#: Measured durations of the session fixtures (seconds), printed at the end of the session.
TIMINGS: dict[str, float] = {}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the swarm tests need root (they start their own dockerd)"
    for tool in ("dockerd", "docker", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install -y docker.io debootstrap)"
    return None


def _pids_under(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (containerd and shims of our daemon), by PID."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop(pid: int, timeout_s: float = 20.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _unmount_under(path: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(str(path))), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@pytest.fixture(scope="session")
def swarm_docker():
    """A DockerCli talking to a private dockerd that is the manager of a one-node swarm."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    top = Path(tempfile.mkdtemp(prefix="llswarm-"))  # short: the socket path must stay < 108 bytes
    (top / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(top / "key.json")}))
    sock = f"unix://{top}/docker.sock"
    log = open(top / "dockerd.log", "wb")  # noqa: SIM115 - closed at teardown
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            "dockerd",
            "--config-file", str(top / "daemon.json"),
            "--data-root", str(top / "data"),
            "--exec-root", str(top / "x"),
            "-H", sock,
            "--pidfile", str(top / "docker.pid"),
            f"--storage-driver={storage_driver(top / 'data')}",  # overlay2 on ext4/xfs, else vfs
            "--iptables=false",
            "--bridge=none",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
        start_new_session=True,
    )  # fmt: skip
    docker = DockerCli(sock)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (top / "dockerd.log").read_text(errors="replace")[-1500:]
                pytest.skip(f"dockerd could not be started (exit {proc.poll()}): {tail}")
            if docker.run(["info", "--format", "{{.ID}}"], check=False, timeout_s=5).strip():
                break
            time.sleep(0.2)
        # a port of its own: the host (or another test run) may already run a swarm manager on 2377
        from layerline.runtime.ports import free_port

        raft = f"127.0.0.1:{free_port('127.0.0.1')}"
        docker.run(["swarm", "init", "--advertise-addr", raft, "--listen-addr", raft])
        TIMINGS["dockerd start + swarm init"] = time.monotonic() - t0
        yield docker
    finally:
        with contextlib.suppress(EngineError):
            docker.run(["swarm", "leave", "--force"], check=False, timeout_s=30)
        _stop(proc.pid)
        for pid in _pids_under(top):
            _stop(pid, 5.0)
        log.close()
        _unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def worker_image(swarm_docker) -> str:
    """The worker image built FROM a local bookworm base (rootfs and wheels cached between runs)."""
    from layerline.engines.swarm.image import build_worker_image, download_wheels
    from layerline.engines.swarm.testbase import cache_dir, ensure_base_image

    t0 = time.monotonic()
    base = ensure_base_image(swarm_docker)
    TIMINGS["base image (debootstrap or cache) + import"] = time.monotonic() - t0
    wheels = cache_dir() / "worker-wheels-py311"
    if not all(list(wheels.glob(p)) for p in ("pip-*.whl", "onnxruntime-*.whl", "numpy-*.whl")):
        t0 = time.monotonic()
        download_wheels(wheels)
        TIMINGS["wheel download"] = time.monotonic() - t0
    built = build_worker_image(
        base_image=base, tag="layerline-worker:test", docker=swarm_docker, wheels=wheels
    )
    TIMINGS["worker image build"] = built.build_s
    TIMINGS["worker image size MB"] = built.size_bytes / 1e6
    return built.tag


@pytest.fixture(scope="session")
def gateway_image(swarm_docker, worker_image, swarm_timings) -> str:
    """The gateway image on top of the worker image, tagged as the engine's default gateway image."""
    from layerline.engines.swarm.image import build_gateway_image, download_wheels
    from layerline.engines.swarm.testbase import cache_dir

    wheels = cache_dir() / "gateway-wheels-py311"
    if not all(list(wheels.glob(p)) for p in ("pip-*.whl", "aiohttp-*.whl", "prometheus_client-*.whl")):
        import importlib.metadata

        pins = tuple(f"{n}=={importlib.metadata.version(n)}" for n in ("aiohttp", "prometheus_client", "pip"))
        download_wheels(wheels, packages=pins)
    built = build_gateway_image(worker_image, "layerline-gateway:latest", swarm_docker, wheels)
    swarm_timings["gateway image build"] = built.build_s
    swarm_timings["gateway image extra MB"] = (
        built.size_bytes - int(swarm_docker.run(["image", "inspect", "--format", "{{.Size}}", worker_image]))
    ) / 1e6
    return built.tag


@pytest.fixture(scope="session")
def swarm_timings() -> dict[str, float]:
    """Where tests record what they measured (printed in the terminal summary)."""
    return TIMINGS


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line(
            "swarm fixture timings: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items())
        )
