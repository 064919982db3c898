"""A three-device testbed with one dockerd per device in one swarm (needs root, cgroup v1, docker.io).

One testbed for the whole module: the last test kills one dockerd with SIGKILL, takes the testbed down and
checks that nothing is left; the module prints how long ``up`` + ``down`` took.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from testbed_support import leftovers, up_when_free

from layerline.testbed import (
    FleetSpec,
    TestbedError,
    docker_host,
    down,
    load_image,
    load_state,
    status,
    swarm_manager,
)
from layerline.testbed.host import missing_docker, missing_requirements
from layerline.testbed.swarm import nodes

_MISSING = missing_requirements() + missing_docker()
pytestmark = [
    pytest.mark.testbed,
    pytest.mark.swarm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason="; ".join(_MISSING) or "ok"),
]

NAMES = ("n1", "n2", "n3")
FLEET = {
    "name": "swarm3",
    "link": {"rate": "1gbit"},
    "devices": [
        {"name": "n1", "cpu": 0.5, "memory": "384M", "swarm": True},
        {"name": "n2", "cpu": 0.5, "memory": "256M", "swarm": True},
        {"name": "n3", "cpu": 0.25, "memory": "256M", "swarm": True},
    ],
}
IMAGE = "layerline-testbed-busybox:1"
BUSYBOX = Path("/bin/busybox")
#: what the tests measured, printed by the last one
TIMES: dict[str, float] = {}
#: every process of the swarm (daemons, shims, containers), checked after down
PIDS: list[int] = []


@pytest.fixture(scope="module")
def swarm_bed(tmp_path_factory):
    home = tmp_path_factory.mktemp("swarm-home")
    t0 = time.monotonic()
    state = up_when_free(FleetSpec.from_yaml_data(FLEET), home)
    TIMES["up"] = time.monotonic() - t0
    yield home, state
    down(home)  # the last test takes it down itself; this one is for a failed run


def _static_busybox() -> bool:
    """/bin/busybox exists and has no ELF interpreter (Debian's busybox-static)."""
    try:
        data = BUSYBOX.read_bytes()
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def _import_image(host: str) -> str:
    """The smallest image this host can make without a registry: static busybox (2 MB), or the cached
    bookworm root filesystem of the swarm engine's tests when busybox-static is not installed."""
    if _static_busybox():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(BUSYBOX, arcname="bin/busybox")
            for applet in ("sh", "sleep", "cat", "hostname"):
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        data = buf.getvalue()
        argv = ["docker", "-H", host, "import", "-c", "ENV PATH=/bin", "-", IMAGE]
        subprocess.run(argv, input=data, check=True, capture_output=True, timeout=60)
    else:
        from layerline.engines.swarm.testbase import ensure_rootfs_tar

        argv = ["docker", "-H", host, "import", str(ensure_rootfs_tar()), IMAGE]
        subprocess.run(argv, check=True, capture_output=True, timeout=600)
    return IMAGE


def _docker(host: str, *args: str) -> str:
    out = subprocess.run(["docker", "-H", host, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_nodes_are_ready_and_named_after_their_devices(swarm_bed):
    _, state = swarm_bed
    assert swarm_manager(state) == "n1"
    found = nodes(state)
    assert set(found) == set(NAMES)
    assert all(n.state == "Ready" and n.availability == "Active" for n in found.values())
    assert found["n1"].manager_status == "Leader" and found["n2"].manager_status == ""
    hosts = {docker_host(state, n) for n in NAMES}
    assert len(hosts) == 3 and all(h.startswith("unix:///") for h in hosts)
    ids = {_docker(docker_host(state, n), "info", "--format", "{{.Name}} {{.ID}}") for n in NAMES}
    assert {i.split()[0] for i in ids} == set(NAMES) and len({i.split()[1] for i in ids}) == 3
    with pytest.raises(TestbedError, match="no device 'nope'"):
        docker_host(state, "nope")


def test_pinned_services_run_inside_their_devices(swarm_bed):
    _, state = swarm_bed
    mgr = docker_host(state, "n1")
    image = _import_image(mgr)
    t0 = time.monotonic()
    assert load_image(state, image, source_docker_host=mgr) == ["n2", "n3"]
    TIMES["load_image"] = time.monotonic() - t0
    assert load_image(state, image, source_docker_host=mgr) == []  # every daemon has it now
    for name in NAMES:
        _docker(
            mgr,
            *("service", "create", "-d", "--name", f"pin-{name}", "--network", "host"),
            *("--constraint", f"node.hostname=={name}", image, "sleep", "600"),
        )
    for name in NAMES:
        dev, host = state.device(name), docker_host(state, name)
        deadline = time.monotonic() + 60
        while not (
            cid := _docker(host, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name=pin-{name}")
        ):
            assert time.monotonic() < deadline, _docker(mgr, "service", "ps", f"pin-{name}")
            time.sleep(0.2)
        pid = int(_docker(host, "inspect", "--format", "{{.State.Pid}}", cid))
        lines = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
        # the container is beneath the device's cgroups, so the device's CPU quota and memory limit bind it
        assert lines["cpu"].startswith(dev.cpu_cgroup.removeprefix("/sys/fs/cgroup/cpu") + "/docker/"), lines
        mem_dir = dev.memory_cgroup.removeprefix("/sys/fs/cgroup/memory")
        assert lines["memory"].startswith(mem_dir + "/docker/"), lines
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{dev.netns}").st_ino
    TIMES["3 pinned services running"] = time.monotonic() - t0


def test_status_and_cli(swarm_bed):
    home, _ = swarm_bed
    st = status(home)
    assert st is not None and st.healthy, st
    for d in st.devices:
        assert d.dockerd_running and d.docker_host and d.node_state == "Ready"
        assert d.node_availability == "Active"
    assert [d.node_role for d in st.devices] == ["manager", "worker", "worker"]
    env = {**os.environ, "LAYERLINE_HOME": str(home)}
    cli = [sys.executable, "-m", "layerline.cli.main", "testbed"]
    out = subprocess.run(
        [*cli, "docker", "n2", "--", "info", "--format", "{{.Name}}"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "n2", out.stderr
    js = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True)
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["swarm_manager"] == "n1" and [d["node_state"] for d in doc["devices"]] == ["Ready"] * 3


def test_down_after_kill9_of_a_dockerd_leaves_nothing(swarm_bed):
    home, state = swarm_bed
    for dev in state.devices:  # daemons, containerd, shims, containers: every process of every device
        for group in (Path(dev.cpu_cgroup), *Path(dev.cpu_cgroup).rglob("*")):
            if group.is_dir():
                PIDS.extend(int(p) for p in (group / "cgroup.procs").read_text().split())
    victim = next(r for r in load_state(home).processes() if r.name == "dockerd:n2")
    assert victim.pid in PIDS and len(PIDS) >= 3 * 3  # dockerd, containerd, shim, sleep per device
    os.kill(victim.pid, signal.SIGKILL)
    time.sleep(0.2)
    t0 = time.monotonic()
    removed = down(home)
    TIMES["down"] = time.monotonic() - t0
    assert removed and leftovers(state.testbed_id, PIDS, [home]) == []
    assert down(home) == [] and load_state(home) is None
    total = TIMES["up"] + TIMES["down"]
    print("swarm testbed of 3 devices: " + ", ".join(f"{k} {v:.2f} s" for k, v in TIMES.items()))
    print(f"up + down {total:.2f} s")
    assert total < 60  # the target for a 3-device swarm on a 2-core host
