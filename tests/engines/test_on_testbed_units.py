"""The local engine's testbed parts that need no running testbed: wrapped spawns, placement, endpoints,
refusals. A real fleet is exercised in ``tests/integration/test_testbed_fleet.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from layerline.engines import on_testbed, processes
from layerline.engines.configs import Endpoints, write_deployment_files
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.placement import place
from layerline.engines.stages import DeployTarget
from layerline.engines.state import list_deployments
from layerline.errors import EngineError
from layerline.profile import testbed_devices as tbd
from layerline.testbed import FleetSpec
from layerline.testbed.state import DeviceRecord, TestbedState

FLEET = {
    "name": "pis",
    "devices": [
        {"name": "pi1", "cpu": 0.5, "memory": "256M"},
        {"name": "pi2", "cpu": 1.5, "memory": "512M"},
    ],
}


def gone_state() -> TestbedState:
    """A testbed state whose devices (namespaces, cgroups) do not exist: one taken down meanwhile."""
    fleet = FleetSpec.from_yaml_data(FLEET)
    devices = tuple(
        DeviceRecord(d, f"10.213.0.{10 + i}", f"ll-0f0f0f-{d.name}", f"/nonexistent/{d.name}", "/nonexistent")
        for i, d in enumerate(fleet.devices)
    )
    return TestbedState("ll-0f0f0f", fleet, "ll-0f0f0f-sw", "10.213.0.0/24", devices, phase="up")


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    from layerline.examples import build_example
    from layerline.graph import slice_model

    root = tmp_path_factory.mktemp("tiny")
    slice_model(build_example("vgg16-tiny", root), root / "m.sliced")
    return root / "m.sliced"


def plan_target(sliced: Path) -> DeployTarget:
    return DeployTarget(sliced, ((0, 8), (8, 16)), ("pi2", "pi1"), "plan", (None, None), "pi1")


def test_a_wrapped_spawn_keeps_the_commands_pid(tmp_path):
    wrap = lambda argv: ["sh", "-c", 'exec "$@"', "layerline-exec", *argv]  # noqa: E731
    proc = processes.spawn(["-c", "import time; time.sleep(30)  # layerline"], tmp_path / "x.log", wrap=wrap)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0] == os.fsencode(sys.executable)  # sh exec'd python: same pid
        assert processes.is_running(proc.pid)
    finally:
        assert processes.stop_processes([proc.pid]) == [proc.pid]
        proc.wait(5)


def test_placement_on_testbed_devices_makes_no_cpu_groups(sliced):
    placed = place(plan_target(sliced), tbd.testbed_cluster(gone_state()))
    assert placed.on_testbed and placed.quotas == {}
    assert [s.threads for s in placed.stages] == [min(2, os.cpu_count() or 1), 1]  # ceil(cpu), as benchmarked
    assert placed.gateway.name == "pi1" and placed.gateway.address == "10.213.0.10"
    assert on_testbed.gateway_settings(DeploySettings("m"), placed).host == "10.213.0.10"
    with pytest.raises(EngineError, match="drop --host"):
        on_testbed.gateway_settings(DeploySettings("m", host="192.0.2.7"), placed)


def test_deploy_refuses_when_the_testbed_is_gone(sliced):
    with pytest.raises(EngineError, match=r"testbed ll-0f0f0f .* is gone.*layerline testbed up"):
        LocalEngine().deploy(
            plan_target(sliced), DeploySettings("m"), cluster=tbd.testbed_cluster(gone_state())
        )
    assert list_deployments() == []


def test_status_problem_names_the_vanished_testbed():
    assert on_testbed.testbed_problem(None) == ""
    record = {"id": "ll-0f0f0f", "devices": {"pi1": {"netns": "ll-0f0f0f-pi1", "cpu_cgroup": "/nonexistent"}}}
    assert "testbed ll-0f0f0f was taken down (devices pi1" in on_testbed.testbed_problem(record)


def test_endpoints_become_listen_addresses_and_next_hops(sliced, tmp_path):
    endpoints = Endpoints((("10.213.0.11", 10001), ("10.213.0.10", 10002)), ("10.213.0.10", 10003))
    settings = DeploySettings("m", host="10.213.0.10", port=8765)
    files = write_deployment_files(plan_target(sliced), settings, tmp_path, [2, 1], endpoints)
    first, last = (json.loads(p.read_text()) for p in files.worker_configs)
    assert (first["listen"], first["downstream"]) == (
        {"host": "10.213.0.11", "port": 10001},
        {"host": "10.213.0.10", "port": 10002},
    )
    assert last["downstream"] == {"host": "10.213.0.10", "port": 10003}
    gateway = json.loads(files.gateway_config.read_text())
    assert gateway["settings"]["host"] == "10.213.0.10"
    assert gateway["pipeline"] == {
        "host": "10.213.0.11",
        "port": 10001,
        "stages": 2,
        "result_host": "10.213.0.10",
        "result_port": 10003,
    }
