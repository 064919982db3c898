"""Fleet file parsing and validation (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerline.testbed import FleetSpec, TestbedError, load_fleet
from layerline.testbed.spec import parse_delay, parse_loss, parse_memory, parse_rate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleets"


def test_units():
    assert parse_rate("100mbit") == 100_000_000
    assert parse_rate("1.5Gbit") == 1_500_000_000
    assert parse_memory("512M") == 512 * 2**20
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_delay("10ms") == 10.0
    assert parse_delay("0.04s") == 40.0
    assert parse_loss("0.5%") == pytest.approx(0.005)
    assert parse_loss(0.01) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("func", "value", "needle"),
    [
        (parse_rate, "100mb", "100mbit"),
        (parse_memory, "lots", "512M"),
        (parse_memory, "1M", "16M"),
        (parse_delay, "fast", "10ms"),
        (parse_loss, "100%", "below 100%"),
    ],
)
def test_bad_units_name_the_fix(func, value, needle):
    with pytest.raises(TestbedError, match=needle):
        func(value)


def test_defaults_merge_and_round_trip():
    spec = FleetSpec.from_yaml_data(
        {
            "name": "t",
            "link": {"rate": "20mbit", "delay": "5ms"},
            "devices": [
                {"name": "a", "cpu": 0.5, "memory": "64M"},
                {"name": "b", "cpu": 1, "memory": "64M", "link": {"loss": "1%"}},
            ],
        }
    )
    a, b = spec.devices
    assert (a.link.rate_bit, a.link.delay_ms, a.link.loss) == (20_000_000, 5.0, 0.0)
    assert (b.link.rate_bit, b.link.loss) == (20_000_000, pytest.approx(0.01))
    assert FleetSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"devices": []}, "non-empty"),
        ({"devices": [{"name": "A", "cpu": 1, "memory": "64M"}]}, "lowercase"),
        ({"devices": [{"name": "a", "memory": "64M"}]}, "cpu"),
        ({"devices": [{"name": "a", "cpu": 1, "memory": "64M", "gpu": 1}]}, "unknown keys"),
        ({"devices": [{"name": "a", "cpu": 1, "memory": "64M"}] * 2}, "unique"),
        ({"format_version": 2, "devices": [{"name": "a", "cpu": 1, "memory": "64M"}]}, "format_version"),
        ({"devices": [{"name": "a", "cpu": 1, "memory": "128M", "swarm": True}]}, "at least memory: 256M"),
        ({"devices": [{"name": "a", "cpu": 1, "memory": "64M", "swarm": "yes"}]}, "true or false"),
        (
            {"devices": [{"name": "a", "cpu": 1, "memory": "64M", "delays": {"x": "5ms"}}]},
            "'x', which is not",
        ),
        ({"devices": [{"name": "a", "cpu": 1, "memory": "64M", "delays": {"a": "5ms"}}]}, "itself"),
        ({"devices": [{"name": "a", "cpu": 1, "memory": "64M", "delays": ["b"]}]}, "mapping of device name"),
        (
            {
                "devices": [
                    {"name": "a", "cpu": 1, "memory": "64M", "delays": {"b": "soon"}},
                    {"name": "b", "cpu": 1, "memory": "64M"},
                ]
            },
            "not a duration",
        ),
    ],
)
def test_invalid_fleets_are_refused(doc, needle):
    with pytest.raises(TestbedError, match=needle):
        FleetSpec.from_yaml_data(doc)


def test_per_pair_delays_and_swarm():
    spec = FleetSpec.from_yaml_data(
        {
            "link": {"delay": "5ms"},
            "devices": [
                {"name": "a", "cpu": 0.5, "memory": "256M", "swarm": True, "delays": {"b": "30ms", "c": 0}},
                {"name": "b", "cpu": 0.5, "memory": "64M", "link": {"delay": 0}},
                {"name": "c", "cpu": 0.5, "memory": "64M", "link": {"delay": 0}, "delays": {"a": "1ms"}},
            ],
        }
    )
    a, b, c = spec.devices
    assert (a.delay_from("b"), a.delay_from("c"), a.delay_from("host")) == (30.0, 0.0, 5.0)
    assert a.swarm and not b.swarm and a.needs_delayer and c.needs_delayer and not b.needs_delayer
    assert FleetSpec.from_json(spec.to_json()) == spec


def test_examples_load():
    names = {p.stem: load_fleet(p) for p in EXAMPLES.glob("*.yaml")}
    assert {"pis", "trio", "edge-server", "swarm-trio"} <= set(names)
    trio = names["swarm-trio"]
    assert all(d.swarm for d in trio.devices) and sum(d.cpu for d in trio.devices) <= 2
    assert trio.device("node3").delay_from("node1") == 20.0
    pis = names["pis"]
    assert [d.name for d in pis.devices] == ["pi1", "pi2", "pi3"]
    assert all(d.link.rate_bit == 100_000_000 and d.link.delay_ms == 10.0 for d in pis.devices)


def test_host_check_refuses_too_many_cpus():
    import os

    from layerline.testbed.host import check_host, missing_requirements

    if missing_requirements():
        pytest.skip("; ".join(missing_requirements()))
    cores = len(os.sched_getaffinity(0))
    spec = FleetSpec.from_yaml_data({"devices": [{"name": "a", "cpu": cores + 1, "memory": "64M"}]})
    with pytest.raises(TestbedError, match="cores"):
        check_host(spec)
    big = FleetSpec.from_yaml_data({"devices": [{"name": "a", "cpu": 0.1, "memory": "100000G"}]})
    with pytest.raises(TestbedError, match="available"):
        check_host(big)
