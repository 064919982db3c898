"""`layerline configure` as a user runs it: a hand-written profile in, a deployable plan and a picture out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from layerline.engines.stages import resolve_target
from layerline.examples import build_example
from layerline.graph import Manifest, slice_model
from layerline.plan import load_plan, validate_plan

SVG = "{http://www.w3.org/2000/svg}"


def layerline(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "layerline.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def _latency(device: str, block: int, n: int) -> float:
    """cam is slow everywhere; edge1 is fast on the first half, edge2 on the second; edge3 is middling."""
    first = block < n // 2
    return {
        "cam": 0.010,
        "edge1": 0.001 if first else 0.006,
        "edge2": 0.006 if first else 0.001,
        "edge3": 0.004,
    }[device]


def _profile(num_blocks: int, sliced: str) -> dict:
    names = ("cam", "edge1", "edge2", "edge3")
    device = {
        "address": "127.0.0.1",
        "labels": {},
        "engine": "local",
        "cores": 2,
        "cpu_quota": None,
        "memory_total_bytes": 4_000_000_000,
        "memory_available_bytes": 2_000_000_000,
        "memory_budget_bytes": 0,
        "measured_at": 1.0,
        "onnxruntime": "1.32.0",
    }
    blocks = [
        {
            "device": d,
            "block": b,
            "batch": 1,
            "latency_s": {
                "median": _latency(d, b, num_blocks),
                "p90": 0.0,
                "min": 0.0,
                "repeats": 5,
                "warmup": 1,
            },
            "memory_bytes": {"weights": 0, "activations_peak": 0, "rss_delta": 0},
        }
        for d in names
        for b in range(num_blocks)
    ]
    links = [
        {
            "src": a,
            "dst": b,
            "rtt_s": {"median": 0.0004, "p90": 0.0005},
            "one_way_latency_s": 0.0002,
            "bandwidth_Bps": 1e8,
            "transfer_sizes_bytes": [16384],
            "measured_at": 1.0,
        }
        for a in names
        for b in names
        if a != b
    ]
    return {
        "format": "layerline.profile",
        "format_version": 1,
        "created_at": 1.0,
        "layerline_version": "0.1.0",
        "sliced": sliced,
        "model_name": "vgg16-tiny",
        "manifest_sha256": "0" * 64,
        "batch_sizes": [1],
        "devices": [dict(device, name=n) for n in names],
        "blocks": blocks,
        "links": links,
        "failures": [],
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("configure")
    model = build_example("vgg16-tiny", root / "vgg.onnx")
    manifest = slice_model(model, root / "vgg.sliced")
    (root / "profiles").mkdir()
    doc = _profile(manifest.num_blocks, "../vgg.sliced")  # relative to the profile file
    (root / "profiles" / "vgg.profile.json").write_text(json.dumps(doc))
    return root


def test_configure_writes_a_deployable_plan_a_table_and_a_picture(workdir, tmp_path):
    profile = workdir / "profiles" / "vgg.profile.json"
    plan_path = tmp_path / "plans" / "vgg.plan.json"
    plan_path.parent.mkdir()
    picture = tmp_path / "timeline.svg"
    out = layerline(
        "configure", str(profile), "--source", "cam", "-o", str(plan_path), "--picture", str(picture)
    )
    assert out.returncode == 0, out.stderr
    for text in ("stage", "transfer in", "memory / budget", "predicted latency", "solver:", "baselines"):
        assert text in out.stdout
    for text in ("all on the source", "all on the fastest device", "even split by blocks", "best two-way"):
        assert text in out.stdout
    # the plan: relative path to the sliced model, valid for the model, accepted by deploy's resolver
    raw = json.loads(plan_path.read_text())
    assert not Path(raw["sliced"]).is_absolute()
    plan = load_plan(plan_path)
    n = Manifest.load(plan.sliced).num_blocks
    validate_plan(plan, n)
    target = resolve_target(plan_path, None)
    assert target.sliced_dir.resolve() == (workdir / "vgg.sliced").resolve()
    assert [s.device for s in plan.stages] == ["edge1", "edge2"]  # each half on the device fast at it
    assert target.ranges == ((0, n // 2), (n // 2, n))
    assert plan.objective == "latency" and plan.predicted["latency_s"] > 0
    # the picture: one lane for cam (source and sink) and one per stage device, one compute box per stage
    root = ET.fromstring(picture.read_bytes())
    lanes = [g.get("data-device") for g in root.iter(f"{SVG}g") if g.get("class") == "lane"]
    assert lanes == ["cam", "edge1", "edge2"]
    compute = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "compute"]
    assert len(compute) == len(plan.stages)


def test_configure_json_has_plan_baselines_and_ratios(workdir):
    profile = workdir / "profiles" / "vgg.profile.json"
    out = layerline("configure", str(profile), "--source", "cam", "--objective", "throughput", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["plan"]["format"] == "layerline.plan" and doc["plan"]["objective"] == "throughput"
    assert doc["plan_file"] is None
    pred = doc["predicted"]
    assert pred["throughput_rps"] == pytest.approx(1 / pred["bottleneck_s"])
    assert (
        doc["solver"]["solve_time_s"] < 2.0 and doc["solver"]["total_time_s"] >= doc["solver"]["solve_time_s"]
    )
    assert set(doc["baselines"]) == {"all_on_source", "all_on_fastest", "even_split", "best_two_way"}
    for name, base in doc["baselines"].items():
        assert base["feasible"], name
        # nothing beats the optimum at its own objective
        assert base["throughput_ratio"] <= 1 + 1e-9, name
    src = doc["baselines"]["all_on_source"]
    assert src["stages"] == [[0, doc["num_blocks"], "cam"]]
    assert src["latency_s"] == pytest.approx(0.010 * doc["num_blocks"])
    stage = doc["stages"][0]
    assert stage["memory_budget_bytes"] == int(0.8 * 2_000_000_000)
    assert stage["overhead_s"] == 0.0  # this profile predates hop overheads: every stage pays none


def test_infeasible_inputs_exit_1_with_the_reason(workdir):
    profile = str(workdir / "profiles" / "vgg.profile.json")
    out = layerline("configure", profile, "--source", "cam", "--memory-fraction", "0.0000001")
    assert out.returncode == 1
    assert "needs" in out.stderr and "bytes" in out.stderr and "--memory-fraction" in out.stderr
    out = layerline("configure", profile, "--source", "cam", "--pin", "0-2=edge1", "--exclude", "edge1")
    assert out.returncode == 1
    assert "pinned to 'edge1', which is excluded" in out.stderr
    out = layerline("configure", profile, "--source", "cam", "--min-throughput", "100000")
    assert out.returncode == 1
    assert "unreachable" in out.stderr
    out = layerline("configure", profile, "--source", "cam", "--pin", "zero=edge1")
    assert out.returncode == 1 and "'zero' is not a block number" in out.stderr
    out = layerline("configure", profile, "--source", "phone")
    assert out.returncode == 1 and "--source 'phone' is not a profiled device" in out.stderr
    out = layerline("configure", str(workdir / "missing.json"), "--source", "cam")
    assert out.returncode == 1 and "no profile at" in out.stderr
    assert layerline("configure", profile).returncode == 2  # --source is required


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_png_without_matplotlib_suggests_svg(workdir, tmp_path):
    profile = str(workdir / "profiles" / "vgg.profile.json")
    out = layerline("configure", profile, "--source", "cam", "--picture", str(tmp_path / "t.png"))
    assert out.returncode == 1
    assert "matplotlib" in out.stderr and "t.svg" in out.stderr
