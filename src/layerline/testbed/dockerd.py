"""One dockerd inside a ``swarm: true`` device: its cgroups, network, hostname, mounts and files.

The daemon joins the device's cgroup in every hierarchy (cpu and memory carry the device's limits; the
other hierarchies get a device directory too, so nothing docker makes lands outside the testbed), then
enters the device's network namespace and unshares a cgroup, UTS and mount namespace:

- **cgroup namespace**: the device's cgroups are the daemon's root, so ``--cgroup-parent=/docker`` puts
  every container at ``DEVICE/docker/ID`` in each hierarchy, under the device's CPU quota and memory limit.
- **mount namespace** (propagation ``slave``: mounts made inside never reach the host) with a fresh
  ``sysfs`` (its ``/sys/class/net`` shows the device's interfaces, as ``ip netns exec`` does), the cgroup
  hierarchies mounted again over a tmpfs (needed: mounts made in the cgroup namespace are rooted at the
  device, matching what ``/proc/self/cgroup`` says) and a private tmpfs on ``/run/containerd``, where
  containerd's shims put their sockets. Whatever the daemon mounts disappears with its processes.
- **UTS namespace** with hostname = device name, so swarm nodes are named after their devices.

Its own ``--data-root``, ``--exec-root``, socket, pidfile and ``deprecated-key-path`` (engine ID) keep the
daemons apart; overlay2 storage where the data root's filesystem supports it (ext4, xfs), else vfs (which
copies every image layer and every container in full); ``LAYERLINE_TESTBED_STORAGE_DRIVER`` overrides the
choice; no iptables rules, no bridge. The launcher reads a ``go`` line before it becomes dockerd (same
PID, same start time), so the process is in the state file before the daemon starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from layerline.testbed import cgroups
from layerline.testbed.errors import TestbedError
from layerline.testbed.netns import NETNS_DIR
from layerline.testbed.state import DaemonRecord, DeviceRecord, process_start_time

__all__ = [
    "MAX_SOCKET_PATH",
    "Launch",
    "kill_containers",
    "launch",
    "plan_daemon",
    "remove_dir",
    "short_run_root",
    "wait_ready",
]

log = logging.getLogger(__name__)

#: sun_path holds 108 bytes with the terminating NUL
MAX_SOCKET_PATH = 107
#: the longest socket path below a daemon's run dir (containerd's ttrpc socket in the exec root)
_LONGEST_SOCKET = len("/x/containerd/containerd.sock.ttrpc")
CONTAINER_PARENT = "docker"


def plan_daemon(docker_root: Path, testbed_id: str, device: str, cgroup_dirs: list[str]) -> DaemonRecord:
    """Where the device's daemon will keep its files; sockets go to ``/run/layerline-ID/DEVICE`` when the
    data directory's path is too long for them."""
    data = docker_root / device
    run_dir = data
    if len(str(data)) + _LONGEST_SOCKET > MAX_SOCKET_PATH:
        run_dir = short_run_root(testbed_id) / device
    return DaemonRecord(str(data), str(run_dir), tuple(cgroup_dirs))


def short_run_root(testbed_id: str) -> Path:
    return Path("/run") / f"layerline-{testbed_id}"


def _inner_script(dev: DeviceRecord, daemon: DaemonRecord, hierarchies: list[cgroups.Hierarchy]) -> str:
    """Runs in the new namespaces: mounts, hostname, then ``exec dockerd``."""
    q = shlex.quote
    lines = ["set -e", "mount -t sysfs sysfs /sys"]
    if os.path.ismount("/sys/kernel/security"):
        lines.append("mount -t securityfs securityfs /sys/kernel/security")
    root = cgroups.CGROUP_ROOT
    lines.append(f"mount -t tmpfs -o mode=755 cgroup {root}")
    for h in hierarchies:
        point = q(str(h.mountpoint))
        lines.append(f"mkdir -p {point}")
        if h.fstype == "cgroup2":
            lines.append(f"mount -t cgroup2 cgroup2 {point}")
        else:
            lines.append(f"mount -t cgroup -o {q(h.mount_options())} cgroup {point}")
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():  # e.g. cpu -> cpu,cpuacct
            lines.append(f"ln -s {q(os.readlink(entry))} {q(str(entry))}")
    lines += [
        "mkdir -p /run/containerd",
        "mount -t tmpfs -o mode=700 containerd /run/containerd",
        f"hostname {q(dev.spec.name)}",
        "export DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1",
    ]
    argv = [
        *("dockerd", "--config-file", daemon.config_file, "--data-root", daemon.data_root),
        *("--exec-root", daemon.exec_root, "-H", daemon.host, "--pidfile", daemon.pidfile),
        f"--storage-driver={storage_driver(Path(daemon.data_root))}",
        *("--iptables=false", "--bridge=none"),
        *(f"--cgroup-parent=/{CONTAINER_PARENT}", "--exec-opt", "native.cgroupdriver=cgroupfs"),
        "--log-level=warn",
    ]
    lines.append("exec " + " ".join(q(a) for a in argv))
    return "\n".join(lines)


#: Backing filesystems overlay2 works on (as the kernel's overlayfs upper/lower layers).
_OVERLAY_BACKINGS = {"ext4", "xfs"}


def storage_driver(data_root: Path) -> str:
    """``overlay2`` when the kernel has overlayfs and ``data_root`` lies on ext4 or xfs, else ``vfs``."""
    forced = os.environ.get("LAYERLINE_TESTBED_STORAGE_DRIVER")
    if forced:
        return forced
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "vfs"
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return "vfs"
    path = str(data_root.resolve())
    best, fstype = "", ""
    for fields in mounts:
        point = fields[1]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return "overlay2" if fstype in _OVERLAY_BACKINGS else "vfs"


def _outer_script(dev: DeviceRecord, daemon: DaemonRecord, inner: str) -> str:
    """Prints its PID, waits for ``go``, joins the cgroups, enters the network namespace, unshares."""
    q = shlex.quote
    joins = "\n".join(f"echo $$ > {q(str(Path(cg) / 'cgroup.procs'))} || exit 1" for cg in daemon.cgroups)
    enter = f"nsenter --net={q(str(NETNS_DIR / dev.netns))} --"
    unshare = "unshare --cgroup --uts --mount --propagation slave --"
    return (
        'echo $$\nread -r gate || exit 1\n[ "$gate" = go ] || exit 1\n'
        f"exec >>{q(daemon.log)} 2>&1 </dev/null\n{joins}\n"
        f"exec {enter} {unshare} sh -c {q(inner)} {q('dockerd-' + dev.spec.name)}"
    )


class Launch:
    """A launched daemon waiting for ``go``: its PID and start time are known, nothing runs yet."""

    def __init__(self, proc: subprocess.Popen, pid: int) -> None:
        self._proc = proc
        self.pid = pid
        self.start_time = process_start_time(pid)

    def release(self) -> None:
        """Let the launcher become dockerd."""
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.write(b"go\n")
            self._proc.stdin.close()

    def abort(self) -> None:
        """Close the gate without ``go``: the launcher exits."""
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.close()


def launch(dev: DeviceRecord, hierarchies: list[cgroups.Hierarchy], timeout: float = 10.0) -> Launch:
    """Prepare the daemon's directories and config and start its launcher (a daemon of init, in its own
    session), stopped at the gate; call :meth:`Launch.release` once the PID is recorded."""
    daemon = dev.daemon
    assert daemon is not None
    for d in (daemon.dir, daemon.run_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    config = {"deprecated-key-path": str(Path(daemon.dir) / "key.json")}
    Path(daemon.config_file).write_text(json.dumps(config, indent=2) + "\n")
    script = _outer_script(dev, daemon, _inner_script(dev, daemon, hierarchies))
    proc = subprocess.Popen(
        ["setsid", "-f", "sh", "-c", script, f"launch-{dev.spec.name}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else b""
    proc.stdout.close()
    proc.wait(timeout=timeout)  # setsid itself; the launcher lives on as a child of init
    if not line.isdigit():
        raise TestbedError(f"the dockerd launcher of device {dev.spec.name!r} did not start (got {line!r})")
    return Launch(proc, int(line))


def _api_ready(daemon: DaemonRecord) -> bool:
    if not Path(daemon.socket).exists():
        return False
    proc = subprocess.run(
        ["docker", "-H", daemon.host, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


def wait_ready(dev: DeviceRecord, pid: int, start_time: int | None, timeout: float = 60.0) -> None:
    """Wait until the daemon answers on its socket; TestbedError with its log when it dies or hangs."""
    daemon = dev.daemon
    assert daemon is not None
    deadline = time.monotonic() + timeout
    while not _api_ready(daemon):
        alive = process_start_time(pid) == start_time
        if not alive or time.monotonic() > deadline:
            try:
                tail = Path(daemon.log).read_text(errors="replace")[-1500:].strip()
            except OSError:
                tail = "(no log)"
            why = "exited" if not alive else f"did not answer within {timeout:g} s"
            raise TestbedError(
                f"dockerd of device {dev.spec.name!r} {why}; its log {daemon.log} ends with:\n{tail}"
            )
        time.sleep(0.1)


def kill_containers(daemon: DaemonRecord) -> list[int]:
    """SIGKILL every process in the daemon's container cgroups (``DEVICE/docker/*``), so that a stopping
    daemon does not wait for containers that ignore SIGTERM; returns their PIDs."""
    if not daemon.cgroups:
        return []
    top = Path(daemon.cgroups[0]) / CONTAINER_PARENT
    cgroups.thaw_tree(top)
    killed = []
    for cg in [top, *sorted(top.rglob("*"))] if top.is_dir() else []:
        for pid in cgroups.cgroup_pids(cg):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def _mounts_under(path: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(path) or point.startswith(f"{path}/"):
            points.append(point)
    return points


def remove_dir(path: str | Path) -> None:
    """Unmount whatever is mounted beneath ``path`` (deepest first), then delete it; gone is fine."""
    p = Path(path)
    for point in sorted(_mounts_under(p), key=len, reverse=True):
        log.info("unmounting %s", point)
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if not p.exists():
        return
    shutil.rmtree(p, ignore_errors=True)
    if p.exists():
        raise TestbedError(f"cannot remove {p}; remove it by hand (rm -rf), then run down again")
