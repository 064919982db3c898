"""Profile file round trip and version check, cluster YAML errors, and the benchmark's formulas."""

from __future__ import annotations

import json

import pytest

from layerline.errors import FormatError
from layerline.profile import (
    BlockMeasurement,
    DeviceProfile,
    Failure,
    LatencyStats,
    LinkMeasurement,
    MemoryUse,
    Profile,
    default_cluster,
    load_cluster,
    load_profile,
    parse_cluster,
    save_profile,
)
from layerline.profile.stats import bandwidth_Bps, median_p90, one_way_latency_s, transfer_sizes


def _profile(sliced: str) -> Profile:
    dev = DeviceProfile(
        "edge1", "127.0.0.1", "local", 2, 0.5, 8_000, 6_000, 5_000, 12.5, "1.32.0", {"tier": "e"}
    )
    block = BlockMeasurement(
        "edge1", 0, 4, LatencyStats(0.002, 0.003, 0.001, 20, 3), MemoryUse(100, 200, 300)
    )
    link = LinkMeasurement("edge1", "edge2", 0.04, 0.05, 0.02, 1.5e6, (16384, 409600), 13.0)
    return Profile(
        sliced,
        "m",
        "ab" * 32,
        (1, 4),
        (dev,),
        (block,),
        (link,),
        (Failure("edge3", "agent", "no answer"),),
        11.0,
        "0.1.0",
    )


def test_profile_round_trip_and_lookups(tmp_path):
    sliced = tmp_path / "m.sliced"
    sliced.mkdir()
    out = tmp_path / "sub" / "p.json"
    prof = _profile(str(sliced))
    save_profile(prof, out)
    data = json.loads(out.read_text())
    assert data["sliced"] == "../m.sliced"  # stored relative to the profile's folder
    assert data["links"][0]["rtt_s"] == {"median": 0.04, "p90": 0.05}
    assert data["blocks"][0]["latency_s"]["repeats"] == 20
    back = load_profile(out)
    assert back == prof  # absolute again after loading
    assert back.block_latency("edge1", 0, 4) == 0.002
    assert back.block_latency("edge1", 0, 1) is None
    assert back.link("edge1", "edge2").bandwidth_Bps == 1.5e6
    assert back.link("edge2", "edge1") is None


def test_profile_version_and_format_checked(tmp_path):
    path = tmp_path / "p.json"
    data = _profile("x").to_json()
    path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(FormatError, match=r"p\.json.*format_version 99.*layerline benchmark"):
        load_profile(path)
    path.write_text(json.dumps({**data, "format": "layerline.plan"}))
    with pytest.raises(FormatError, match="not a layerline profile"):
        load_profile(path)
    del data["devices"]
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"malformed profile.*devices"):
        load_profile(path)
    with pytest.raises(FormatError, match="no profile at"):
        load_profile(tmp_path / "missing.json")


def test_cluster_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "devices:\n  - name: edge1\n    labels: {tier: edge}\n    cpu_quota: 0.5\n"
        "  - name: edge2\n    memory_bytes: 2000000000\n"
    )
    cluster = load_cluster(path)
    assert cluster.names == ("edge1", "edge2")
    assert cluster.device("edge1").cpu_quota == 0.5 and cluster.device("edge1").labels == {"tier": "edge"}
    assert cluster.device("edge2").memory_bytes == 2_000_000_000 and cluster.device("edge2").cpu_quota is None
    assert default_cluster().names == ("local",)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("devices: [\n", r"c\.yaml:\d+: not valid YAML"),
        ("nodes: []\n", "a mapping with a 'devices' list"),
        ("devices: []\n", "c.yaml:1: 'devices' must be a non-empty list"),
        ("devices:\n  - name: a\n  - name: a\n", "c.yaml:3: device name 'a' appears twice"),
        ("devices:\n  - name: a\n  - name: 'b c'\n", "c.yaml:3: device name 'b c'"),
        ("devices:\n  - name: a\n    cpu_quota: -1\n", "c.yaml:2: device 'a' cpu_quota must be a positive"),
        ("devices:\n  - name: a\n    engine: swarm\n", "engine 'swarm'; supported engines"),
        ("devices:\n  - name: a\n    address: 10.0.0.2\n", "local engine.*127.0.0.1"),
        ("devices:\n  - name: a\n    gpu: 1\n", r"unknown key\(s\) \['gpu'\]"),
        ("devices:\n  - name: a\n    memory_bytes: 1.5\n", "memory_bytes must be a positive integer"),
    ],
)
def test_cluster_yaml_errors_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(FormatError, match=match):
        load_cluster(path)


def test_cluster_missing_file(tmp_path):
    with pytest.raises(FormatError, match="cannot read cluster file"):
        load_cluster(tmp_path / "nope.yaml")
    assert parse_cluster("devices:\n  - {name: x}\n").names == ("x",)


def test_formulas():
    med, p90, low = median_p90([0.3, 0.1, 0.2, 0.4, 0.5])
    assert (med, low) == (0.3, 0.1)
    assert p90 == pytest.approx(0.46)
    assert one_way_latency_s(0.04) == 0.02
    # 1 MB in 0.54 s including one 0.04 s round trip → 1e6 / 0.5 = 2 MB/s (bytes, not bits)
    assert bandwidth_Bps(1_000_000, 0.54, 0.04) == pytest.approx(2e6)
    # a transfer no slower than the ping is floored, not infinite or negative
    assert bandwidth_Bps(1000, 0.01, 0.02) == pytest.approx(1000 / (0.05 * 0.01))
    with pytest.raises(ValueError):
        bandwidth_Bps(0, 1.0, 0.1)
    assert transfer_sizes([1000, None, 409600, 409600, 16384 * 8]) == (409600, 131072, 65536)
    assert transfer_sizes([5, 6, 7, 8, 9, 10], cap=3, minimum=1) == (10, 8, 5)
    assert transfer_sizes([None]) == (65536,)


def test_agent_imports_only_what_a_device_has():
    import subprocess
    import sys

    import layerline.profile as lp

    assert all(getattr(lp, name) is not None for name in lp.__all__)
    code = (
        "import sys, layerline.profile.agent; "
        "heavy = ('onnx', 'yaml', 'rich', 'aiohttp', 'torch', 'layerline.graph'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
