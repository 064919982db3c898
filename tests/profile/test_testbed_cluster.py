"""Cluster devices on the emulated testbed (``engine: testbed``), resolved against a testbed's state.

The state here is a real :class:`TestbedState` describing devices that do not exist (no root needed); the
tests with a real fleet are in ``tests/integration/test_testbed_fleet.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from layerline.cli.main import main
from layerline.errors import EngineError, FormatError
from layerline.profile import testbed_devices as tbd
from layerline.profile.agent import cgroup_memory
from layerline.profile.cluster import parse_cluster
from layerline.testbed import FleetSpec
from layerline.testbed.state import DeviceRecord, TestbedState

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not os.path.exists("/proc/self/cgroup"), reason="Linux /proc needed"
)

FLEET = {
    "name": "pis",
    "devices": [
        {"name": "pi1", "cpu": 0.5, "memory": "256M"},
        {"name": "pi2", "cpu": 1.5, "memory": "512M"},
    ],
}


def fake_state(tid: str = "ll-0f0f0f") -> TestbedState:
    """The state of a testbed whose namespaces and cgroups do not exist."""
    fleet = FleetSpec.from_yaml_data(FLEET)
    devices = tuple(
        DeviceRecord(
            d, f"10.213.0.{10 + i}", f"{tid}-{d.name}", f"/nonexistent/cpu/{d.name}", "/nonexistent/mem"
        )
        for i, d in enumerate(fleet.devices)
    )
    return TestbedState(tid, fleet, f"{tid}-sw", "10.213.0.0/24", devices, phase="up")


def test_testbed_devices_take_address_and_quota_from_the_testbed():
    text = (
        "devices:\n  - {name: pi2, engine: testbed, labels: {tier: edge}}\n  - {name: pi1, engine: testbed}\n"
    )
    cluster = parse_cluster(text, "c.yaml", fake_state())
    assert cluster.names == ("pi2", "pi1")
    pi2, pi1 = cluster.devices
    assert (pi2.engine, pi2.address, pi2.cpu_quota, dict(pi2.labels)) == (
        "testbed",
        "10.213.0.11",
        1.5,
        {"tier": "edge"},
    )
    assert (pi1.address, pi1.cpu_quota, pi1.memory_bytes) == ("10.213.0.10", 0.5, None)
    assert cluster.testbed is not None and cluster.testbed.testbed_id == "ll-0f0f0f"


def test_a_matching_address_is_accepted_and_a_wrong_one_refused():
    ok = parse_cluster(
        "devices:\n  - {name: pi1, engine: testbed, address: 10.213.0.10}\n", "c.yaml", fake_state()
    )
    assert ok.devices[0].address == "10.213.0.10"
    text = "devices:\n  - {name: pi2, engine: testbed}\n  - {name: pi1, engine: testbed, address: 10.0.0.5}\n"
    with pytest.raises(FormatError, match=r"c\.yaml:3: .*'pi1'.*10\.0\.0\.5.*10\.213\.0\.10"):
        parse_cluster(text, "c.yaml", fake_state())


def test_cpu_quota_on_a_testbed_device_is_refused_with_the_fix():
    with pytest.raises(FormatError, match=r"c\.yaml:2: .*fleet.*remove cpu_quota"):
        parse_cluster("devices:\n  - {name: pi1, engine: testbed, cpu_quota: 0.5}\n", "c.yaml", fake_state())


def test_a_device_the_testbed_lacks_lists_its_devices():
    with pytest.raises(FormatError, match=r"'pi9' is not a device.*pi1, pi2.*layerline testbed up"):
        parse_cluster("devices:\n  - {name: pi9, engine: testbed}\n", "c.yaml", fake_state())


def test_local_and_testbed_devices_do_not_mix():
    text = "devices:\n  - {name: pi1, engine: testbed}\n  - {name: here}\n"
    with pytest.raises(FormatError, match=r"\['pi1'\].*\['here'\]"):
        parse_cluster(text, "c.yaml", fake_state())


def test_without_a_running_testbed_the_error_says_how_to_start_one():
    with pytest.raises(EngineError, match=r"no testbed is up.*layerline testbed up"):
        parse_cluster("devices:\n  - {name: pi1, engine: testbed}\n", "c.yaml")
    with pytest.raises(EngineError, match="no testbed is up"):
        tbd.running_testbed()


def test_testbed_cluster_is_the_whole_fleet_in_order():
    cluster = tbd.testbed_cluster(fake_state())
    assert [(d.name, d.address, d.cpu_quota, d.engine) for d in cluster.devices] == [
        ("pi1", "10.213.0.10", 0.5, "testbed"),
        ("pi2", "10.213.0.11", 1.5, "testbed"),
    ]
    assert tbd.testbed_gone(cluster.testbed)  # none of it exists


def test_cli_refuses_cluster_and_testbed_together(tmp_path, capsys):
    for argv in (
        ["benchmark", str(tmp_path), "--cluster", "c.yaml", "--testbed"],
        ["deploy", str(tmp_path), "--cluster", "c.yaml", "--testbed"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err


def test_cli_testbed_without_a_testbed_fails_clearly(tmp_path, capsys):
    from layerline.examples import build_example
    from layerline.graph import slice_model

    sliced = tmp_path / "m.sliced"
    slice_model(build_example("vgg16-tiny", tmp_path), sliced)
    assert main(["benchmark", str(sliced), "--testbed", "-o", str(tmp_path / "p.json")]) == 1
    assert "layerline testbed up" in capsys.readouterr().err.replace("\n", " ")


def test_cgroup_memory_reads_the_tightest_limit(tmp_path):
    own = next(
        (
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":", 2)[1].split(",")
        ),
        None,
    )
    if own is None:
        pytest.skip("this process is in no cgroup v1 memory hierarchy")
    group = tmp_path / "memory" / own.lstrip("/")
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    (group / "memory.usage_in_bytes").write_text(f"{300 << 20}\n")
    (group / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {100 << 20}\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory(tmp_path) == (1 << 30, (1 << 30) - (200 << 20))
