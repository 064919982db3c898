"""Profile + manifest → PlanningProblem: units, budgets, links, constraints, errors and planning speed."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from layerline.errors import PlanError
from layerline.examples import build_example
from layerline.graph import BlockInfo, Boundary, BoundaryTensor, Manifest, slice_model
from layerline.plan import baselines, evaluate_placement, optimize
from layerline.plan.from_profile import (
    parse_blocks,
    parse_exclude,
    parse_forbid,
    parse_pins,
    problem_from_profile,
    stage_summary,
)
from layerline.profile.format import Profile, load_profile
from layerline.tensors import TensorSpec

# Per-block medians (s) at batch 1; batch 2 takes twice as long. "client" has no block measurements.
PER_BLOCK = {"cam": 0.004, "edge1": 0.001, "edge2": 0.002}
AVAILABLE = {"cam": 1_000_000_000, "edge1": 2_000_000_000, "edge2": 500_000_000, "client": 0}
LINKS = [  # (src, dst, one-way latency s, bandwidth B/s); cam -> edge2 is only measured one way
    ("cam", "edge1", 0.001, 1e6),
    ("edge1", "cam", 0.001, 1e6),
    ("edge1", "edge2", 0.0005, 1e8),
    ("edge2", "edge1", 0.0005, 1e8),
    ("cam", "edge2", 0.002, 5e6),
    ("client", "edge1", 0.003, 2e6),
    ("edge1", "client", 0.003, 2e6),
]


def block_latency(device: str, block: int, batch: int) -> float:
    return PER_BLOCK[device] * (1 + 0.1 * block) * batch


def profile_doc(num_blocks: int, sliced: str, batches=(1, 2), budgets=None, skip=()) -> dict:
    """A profile JSON document written by hand, as `layerline benchmark` would."""
    budgets = budgets or {}
    devices = [
        {
            "name": name,
            "address": "127.0.0.1",
            "labels": {},
            "engine": "local",
            "cores": 2,
            "cpu_quota": None,
            "memory_total_bytes": 2 * avail,
            "memory_available_bytes": avail,
            "memory_budget_bytes": budgets.get(name, 0),
            "measured_at": 1.0,
            "onnxruntime": "1.32.0",
        }
        for name, avail in AVAILABLE.items()
    ]
    blocks = [
        {
            "device": dev,
            "block": b,
            "batch": batch,
            "latency_s": {
                "median": block_latency(dev, b, batch),
                "p90": 2 * block_latency(dev, b, batch),
                "min": 0.0,
                "repeats": 20,
                "warmup": 3,
            },
            "memory_bytes": {"weights": 0, "activations_peak": 1000 * (b + 1) * batch, "rss_delta": 0},
        }
        for dev in PER_BLOCK
        for batch in batches
        for b in range(num_blocks)
        if (dev, b) not in skip
    ]
    links = [
        {
            "src": a,
            "dst": b,
            "rtt_s": {"median": 2 * lat, "p90": 3 * lat},
            "one_way_latency_s": lat,
            "bandwidth_Bps": bw,
            "transfer_sizes_bytes": [16384, 409600],
            "measured_at": 1.0,
        }
        for a, b, lat, bw in LINKS
    ]
    return {
        "format": "layerline.profile",
        "format_version": 1,
        "created_at": 1.0,
        "layerline_version": "0.1.0",
        "sliced": sliced,
        "model_name": "vgg16-tiny",
        "manifest_sha256": "0" * 64,
        "batch_sizes": list(batches),
        "devices": devices,
        "blocks": blocks,
        "links": links,
        "failures": [{"device": "client", "what": "blocks", "error": "no agent"}],
    }


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    root = tmp_path_factory.mktemp("vgg")
    model = build_example("vgg16-tiny", root / "vgg.onnx")
    manifest = slice_model(model, root / "vgg.sliced")
    return root / "vgg.sliced", manifest


def write_profile(tmp_path, sliced_dir, manifest, **kw) -> Profile:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_doc(manifest.num_blocks, str(sliced_dir), **kw)))
    return load_profile(path)


def test_problem_units_from_profile_and_manifest(tmp_path, sliced):
    sliced_dir, manifest = sliced
    n = manifest.num_blocks
    profile = write_profile(tmp_path, sliced_dir, manifest)
    built = problem_from_profile(profile, manifest, source="cam", batch=2)
    p = built.problem
    assert p.num_blocks == n
    for dev in PER_BLOCK:
        assert p.compute_s[dev] == pytest.approx([block_latency(dev, b, 2) for b in range(n)])
    # boundary bytes = manifest bytes_batch1 × batch; cut 0 is the model's input (1×3×32×32 float32)
    assert p.boundary_bytes == tuple(b.bytes_batch1 * 2 for b in manifest.boundaries)
    assert p.boundary_bytes[0] == 3 * 32 * 32 * 4 * 2
    assert p.weight_bytes == tuple(b.weight_bytes for b in manifest.blocks)
    for b in range(n):
        io = p.boundary_bytes[b] + p.boundary_bytes[b + 1]
        assert p.activation_bytes[b] == max(1000 * (b + 1) * 2, io)
    # links: one-way latency in s, bandwidth in B/s; cam -> edge2 measured one way only, assumed symmetric
    assert p.link("cam", "edge1") == (0.001, 1e6)
    assert p.link("edge2", "cam") == (0.002, 5e6)
    assert any("edge2 -> cam was not measured" in note for note in built.notes)
    assert p.link("client", "edge2") is None
    assert p.transfer_s("cam", "edge1", 12288) == pytest.approx(0.001 + 12288 / 1e6)
    # budgets: 0.8 × available; the client has no measurements: it runs nothing but may send
    assert p.device("edge1").memory_budget_bytes == int(0.8 * 2_000_000_000)
    assert built.unmeasured == ("client",) and "client" in p.exclude
    assert p.sink_device == "cam"


def test_quota_devices_are_priced_by_their_sustained_time(tmp_path, sliced):
    """Under a CPU quota short runs often escape throttling: the median understates a busy stage.

    On a device with a quota the planner uses the mean of the back-to-back runs; elsewhere the median.
    """
    sliced_dir, manifest = sliced
    doc = profile_doc(manifest.num_blocks, str(sliced_dir))
    for device in doc["devices"]:
        if device["name"] == "edge2":
            device["cpu_quota"] = 0.35
    for m in doc["blocks"]:
        m["latency_s"]["mean"] = 3 * m["latency_s"]["median"]
    path = tmp_path / "quota.json"
    path.write_text(json.dumps(doc))
    profile = load_profile(path)
    assert profile.block(doc["blocks"][0]["device"], 0, 1).latency_s.mean is not None
    p = problem_from_profile(profile, manifest, source="cam", batch=1).problem
    n = manifest.num_blocks
    assert p.compute_s["edge2"] == pytest.approx([3 * block_latency("edge2", b, 1) for b in range(n)])
    assert p.compute_s["edge1"] == pytest.approx([block_latency("edge1", b, 1) for b in range(n)])


def test_hop_overheads_come_from_the_profile(tmp_path, sliced):
    sliced_dir, manifest = sliced
    n = manifest.num_blocks
    old = write_profile(tmp_path, sliced_dir, manifest)  # written before the field existed
    assert all(d.hop_overhead_s is None for d in old.devices)
    plain = problem_from_profile(old, manifest, source="cam").problem
    assert set(plain.hop_overhead_s.values()) == {0.0}
    doc = profile_doc(n, str(sliced_dir))
    for device in doc["devices"]:
        if device["name"] in ("cam", "edge1"):
            device["hop_overhead_s"] = 0.0003 if device["name"] == "cam" else 0.0002
    path = tmp_path / "hop.json"
    path.write_text(json.dumps(doc))
    built = problem_from_profile(load_profile(path), manifest, source="cam")
    p = built.problem
    assert p.hop_overhead_s == {"cam": 0.0003, "edge1": 0.0002, "edge2": 0.0, "client": 0.0}
    assert any("edge2 have no hop overhead measurement" in note for note in built.notes)
    assert not any("client" in note and "hop overhead" in note for note in built.notes)  # runs no stage
    stages = [(0, 5, "cam"), (5, n, "edge1")]
    priced = evaluate_placement(p, stages)
    assert priced.latency_s == pytest.approx(evaluate_placement(plain, stages).latency_s + 0.0005)


def test_plan_prices_match_the_profile(tmp_path, sliced):
    sliced_dir, manifest = sliced
    n = manifest.num_blocks
    profile = write_profile(tmp_path, sliced_dir, manifest)
    p = problem_from_profile(profile, manifest, source="cam", batch=1).problem
    on_source = evaluate_placement(p, [(0, n, "cam")])
    assert on_source.latency_s == pytest.approx(sum(block_latency("cam", b, 1) for b in range(n)))
    cut = 5
    split = evaluate_placement(p, [(0, cut, "cam"), (cut, n, "edge1")])
    expected = (
        sum(block_latency("cam", b, 1) for b in range(cut))
        + 0.001
        + manifest.boundaries[cut].bytes_batch1 / 1e6
        + sum(block_latency("edge1", b, 1) for b in range(cut, n))
        + 0.001
        + manifest.boundaries[n].bytes_batch1 / 1e6
    )
    assert split.latency_s == pytest.approx(expected)
    best = optimize(p, "latency")
    assert best.latency_s <= min(on_source.latency_s, split.latency_s) + 1e-12
    assert all(d != "client" for _, _, d in best.stages)
    # the client may still be the source: it sends the input to edge1 and gets the output back
    q = problem_from_profile(profile, manifest, source="client", batch=1).problem
    plan = optimize(q, "latency")
    assert plan.breakdown[0].transfer_in_s == pytest.approx(0.003 + 12288 / 2e6)
    assert plan.transfer_out_s > 0.003


def test_memory_budgets_explicit_and_fraction(tmp_path, sliced):
    sliced_dir, manifest = sliced
    profile = write_profile(tmp_path, sliced_dir, manifest, budgets={"edge2": 123_456_789})
    p = problem_from_profile(profile, manifest, source="cam", memory_fraction=0.5).problem
    assert p.device("cam").memory_budget_bytes == 500_000_000
    assert p.device("edge2").memory_budget_bytes == 123_456_789  # the profile's explicit budget
    # the benchmark writes the available memory as the budget when none is set: the fraction applies
    same = write_profile(tmp_path, sliced_dir, manifest, budgets={"edge1": 2_000_000_000})
    p = problem_from_profile(same, manifest, source="cam", memory_fraction=0.5).problem
    assert p.device("edge1").memory_budget_bytes == 1_000_000_000
    # a budget too small for the largest block: the optimiser names the block and the bytes
    plain = write_profile(tmp_path, sliced_dir, manifest)
    tiny = problem_from_profile(plain, manifest, source="cam", memory_fraction=1e-5).problem
    with pytest.raises(PlanError, match=r"block \d+ needs \d+ bytes"):
        optimize(tiny, "latency")


def test_constraints_reach_the_problem(tmp_path, sliced):
    sliced_dir, manifest = sliced
    n = manifest.num_blocks
    profile = write_profile(tmp_path, sliced_dir, manifest)
    p = problem_from_profile(
        profile,
        manifest,
        source="cam",
        sink="edge1",
        pins=parse_pins(["0-1=cam"], n),
        forbid=parse_forbid([f"{n - 1}=edge1"], n),
        exclude=parse_exclude(["edge2"]),
    ).problem
    best = optimize(p, "latency")
    assert best.stages[0][2] == "cam" and best.stages[0][1] >= 2
    assert best.stages[-1][2] != "edge1" or best.stages[-1][1] < n
    assert "edge2" not in {d for _, _, d in best.stages}
    assert p.sink_device == "edge1"


def test_parse_constraint_strings():
    assert parse_blocks("0-3,7", 10) == [0, 1, 2, 3, 7]
    assert parse_pins(["0-2=edge1", "5=edge2"], 10) == {0: "edge1", 1: "edge1", 2: "edge1", 5: "edge2"}
    assert parse_forbid(["1=a,b", "1-2=c"], 10) == {1: frozenset("abc"), 2: frozenset("c")}
    assert parse_exclude(["a", "b,c"]) == frozenset("abc")
    with pytest.raises(PlanError, match="block 12 does not exist"):
        parse_pins(["0-12=a"], 10)
    with pytest.raises(PlanError, match="expected BLOCKS=DEVICE"):
        parse_pins(["edge1"], 10)
    with pytest.raises(PlanError, match="pinned to both"):
        parse_pins(["1=a", "0-2=b"], 10)
    with pytest.raises(PlanError, match="runs backwards"):
        parse_forbid(["5-2=a"], 10)
    with pytest.raises(PlanError, match="not a block number"):
        parse_forbid(["x=a"], 10)
    assert stage_summary([(0, 3, "a"), (3, 4, "b")]) == "0-2@a, 3@b"


def test_errors_name_the_problem(tmp_path, sliced):
    sliced_dir, manifest = sliced
    n = manifest.num_blocks
    profile = write_profile(tmp_path, sliced_dir, manifest, batches=(1,), skip={("edge2", 3)})
    with pytest.raises(PlanError, match=r"no block measurements at batch 4 \(measured batch sizes: 1\)"):
        problem_from_profile(profile, manifest, source="cam", batch=4)
    with pytest.raises(PlanError, match=r"'edge2' has no measurement at batch 1 for block\(s\) 3"):
        problem_from_profile(profile, manifest, source="cam")
    ok = problem_from_profile(profile, manifest, source="cam", exclude={"edge2"})
    assert "edge2" in ok.problem.exclude
    with pytest.raises(PlanError, match="--source 'nope' is not a profiled device"):
        problem_from_profile(profile, manifest, source="nope", exclude={"edge2"})
    with pytest.raises(PlanError, match="--exclude 'edge9'"):
        problem_from_profile(profile, manifest, source="cam", exclude={"edge9"})
    with pytest.raises(PlanError, match="'client', which has no block measurements"):
        problem_from_profile(profile, manifest, source="cam", pins={0: "client"}, exclude={"edge2"})
    with pytest.raises(PlanError, match="memory-fraction"):
        problem_from_profile(profile, manifest, source="cam", memory_fraction=1.5)
    # a profile of another slicing
    other = replace(manifest, blocks=manifest.blocks[:3], boundaries=manifest.boundaries[:4])
    with pytest.raises(PlanError, match="block 3 but the sliced model has 3 blocks"):
        problem_from_profile(profile, other, source="cam")
    # a dynamic non-batch dimension: the tensor is named and a fixed shape asked for
    cut = manifest.boundaries[4]
    t = cut.tensors[0]
    dyn = replace(t, spec=replace(t.spec, shape=("batch", "channels", 8, 8)), bytes_batch1=None)
    boundaries = list(manifest.boundaries)
    boundaries[4] = replace(cut, tensors=(dyn,))
    broken = replace(manifest, boundaries=tuple(boundaries))
    with pytest.raises(PlanError, match=rf"{t.spec.name!r} \(cut 4.*fixed shape"):
        problem_from_profile(profile, broken, source="cam", exclude={"edge2"})
    assert n > 4


def _synthetic(num_blocks: int, num_devices: int) -> tuple[Profile, Manifest]:
    spec = TensorSpec("x", "float32", ("batch", 256))
    manifest = Manifest(
        model_name="synthetic",
        source=None,
        ir_version=9,
        opset_imports={"": 17},
        inputs=(spec,),
        outputs=(spec,),
        blocks=tuple(
            BlockInfo(i, f"block_{i:03d}.onnx", (spec,), (spec,), 10_000 + 37 * i, {"Gemm": 1}, 1000, 1)
            for i in range(num_blocks)
        ),
        boundaries=tuple(
            Boundary(k, (BoundaryTensor(spec, 1024 * (1 + k % 7)),)) for k in range(num_blocks + 1)
        ),
    )
    names = [f"d{j}" for j in range(num_devices)]
    doc = profile_doc(0, "synthetic.sliced", batches=(1,))
    doc["devices"] = [
        dict(doc["devices"][0], name=name, memory_available_bytes=10**9, hop_overhead_s=2e-4 * (1 + j % 3))
        for j, name in enumerate(names)
    ]
    doc["blocks"] = [
        dict(
            device=name,
            block=b,
            batch=1,
            latency_s={
                "median": 0.001 * (1 + (b * (j + 3)) % 11) / (j + 1),
                "p90": 0,
                "min": 0,
                "repeats": 1,
                "warmup": 0,
            },
            memory_bytes={"weights": 0, "activations_peak": 0, "rss_delta": 0},
        )
        for j, name in enumerate(names)
        for b in range(num_blocks)
    ]
    link = doc["links"][0]
    doc["links"] = [
        dict(link, src=a, dst=b, one_way_latency_s=0.0005 * (1 + (i + k) % 3), bandwidth_Bps=1e7 * (1 + i))
        for i, a in enumerate(names)
        for k, b in enumerate(names)
        if a != b
    ]
    return Profile.from_json(doc), manifest


def test_300_blocks_8_devices_plan_fast():
    profile, manifest = _synthetic(300, 8)
    started = time.perf_counter()
    built = problem_from_profile(profile, manifest, source="d0")
    best = optimize(built.problem, "latency")
    fast = optimize(built.problem, "throughput")
    baselines(built.problem)
    elapsed = time.perf_counter() - started
    print(f"planning 300 blocks x 8 devices from a profile took {elapsed:.3f} s")
    assert elapsed < 2.0, f"planning 300 blocks x 8 devices took {elapsed:.2f} s"
    assert built.problem.hop_overhead_s["d1"] == 4e-4
    assert all(s.overhead_s == built.problem.hop_overhead_s[s.device] for s in best.breakdown)
    assert best.states == 256  # 8 distinct devices: no grouping shortcut
    assert fast.bottleneck_s <= best.bottleneck_s
    assert best.stages[-1][1] == 300
