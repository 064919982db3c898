"""The plan file: JSON round trip, relative sliced paths, load errors and validate_plan errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from layerline.errors import FormatError, PlanError
from layerline.plan import Device, Plan, PlanStage, full_mesh, load_plan, optimize, save_plan, validate_plan
from layerline.plan.problem import PlanningProblem


def _plan(sliced="/models/m.sliced", **kw):
    args = {
        "model_name": "mlp",
        "sliced": sliced,
        "stages": (PlanStage((0, 2)), PlanStage((2, 3), "pi-1", threads=2), PlanStage((3, 5))),
        "num_blocks": 5,
        "objective": "balanced",
        "predicted": {"latency_s": 0.5, "stages": [{"compute_s": 0.1}]},
        "created_by": "layerline 0.1.0",
    }
    args.update(kw)
    return Plan(**args)


def test_json_round_trip():
    plan = _plan()
    data = plan.to_json()
    assert data["format"] == "layerline.plan" and data["format_version"] == 1
    assert Plan.from_json(json.loads(json.dumps(data))) == plan
    assert Plan.from_json(_plan(predicted=None).to_json()).predicted is None


def test_save_stores_sliced_relative_and_load_resolves_it(tmp_path):
    sliced = tmp_path / "work" / "m.sliced"
    sliced.mkdir(parents=True)
    plans = tmp_path / "work" / "plans"
    plans.mkdir()
    plan = _plan(sliced=str(sliced))
    save_plan(plan, plans / "p.json")
    raw = json.loads((plans / "p.json").read_text())
    assert raw["sliced"] == os.path.join("..", "m.sliced")
    assert load_plan(plans / "p.json") == plan
    # moving the whole tree keeps the plan pointing at its sliced model
    shutil.move(str(tmp_path / "work"), str(tmp_path / "moved"))
    assert load_plan(tmp_path / "moved" / "plans" / "p.json").sliced == str(tmp_path / "moved" / "m.sliced")


def test_save_converts_a_cwd_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    save_plan(_plan(sliced="m.sliced"), tmp_path / "out" / "p.json")
    assert json.loads((tmp_path / "out" / "p.json").read_text())["sliced"] == os.path.join("..", "m.sliced")
    assert load_plan("out/p.json").sliced == str(tmp_path / "m.sliced")


def test_save_rejects_non_finite_predictions(tmp_path):
    with pytest.raises(FormatError, match="finite numbers"):
        save_plan(_plan(predicted={"throughput_rps": float("inf")}), tmp_path / "p.json")
    assert not list(tmp_path.iterdir())


def test_placement_to_plan_round_trips(tmp_path):
    names = ["a", "b"]
    lat, bw = full_mesh(names, 0.001, 1e6)
    problem = PlanningProblem(
        compute_s={"a": [1.0, 1.0, 1.0], "b": [0.1, 0.1, 0.1]},
        weight_bytes=[1, 1, 1],
        activation_bytes=[1, 1, 1],
        boundary_bytes=[10, 10, 10, 10],
        devices=[Device("a"), Device("b")],
        latency_s=lat,
        bandwidth_Bps=bw,
        source="a",
    )
    placement = optimize(problem, "throughput")
    plan = placement.to_plan("tiny", str(tmp_path / "s"), threads=1)
    assert plan.objective == "throughput" and plan.num_blocks == 3
    assert plan.predicted["latency_s"] == placement.latency_s
    save_plan(plan, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json") == plan


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.update(format="other"), "'format' is 'other'"),
        (lambda d: d.update(format_version=2), "format_version 2 is not supported.*upgrade layerline"),
        (lambda d: d.update(format_version=0), "format_version 0 .*re-run `layerline configure`"),
        (lambda d: d.pop("model_name"), "'model_name' is None"),
        (lambda d: d.update(objective="fastest"), "'objective' is 'fastest'"),
        (lambda d: d.update(num_blocks=0), "'num_blocks' is 0"),
        (lambda d: d.update(stages={}), "'stages' is dict"),
        (lambda d: d["stages"][1].update(blocks=[2]), r"stage 1: 'blocks' is \[2\]"),
        (lambda d: d["stages"][1].update(device=""), "stage 1: 'device' is ''"),
        (lambda d: d["stages"][1].update(threads="4"), "stage 1: 'threads' is '4'"),
        (lambda d: d.update(predicted=[1]), "'predicted' is list"),
        (lambda d: d["stages"][1].update(blocks=[3, 3]), "stage 1 starts at block 3 .*gap"),
    ],
)
def test_load_errors_name_the_file_and_problem(tmp_path, mutate, pattern):
    data = _plan().to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=pattern) as err:
        load_plan(path)
    assert str(path) in str(err.value)


def test_load_missing_invalid_and_nan(tmp_path):
    with pytest.raises(FormatError, match=r"no plan file at .*create one with `layerline configure`"):
        load_plan(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FormatError, match=r"bad\.json is not valid JSON: .*line 1"):
        load_plan(bad)
    data = json.dumps(_plan().to_json()).replace('"latency_s": 0.5', '"latency_s": NaN')
    bad.write_text(data)
    with pytest.raises(FormatError, match="NaN is not allowed"):
        load_plan(bad)


def _stages(*items):
    return tuple(PlanStage(b, d) for b, d in items)


@pytest.mark.parametrize(
    ("stages", "num_blocks", "pattern"),
    [
        ((), 5, "no stages; add at least one stage covering blocks \\[0, 5\\)"),
        (_stages(((1, 5), "local")), 5, "stage 0 starts at block 1 .*gap.*start at block 0"),
        (
            _stages(((0, 3), "local"), ((2, 5), "local")),
            5,
            "stage 1 starts at block 2 .*overlap.*start at block 3",
        ),
        (_stages(((0, 0), "local"), ((0, 5), "local")), 5, r"stage 0 has an empty block range \[0, 0\)"),
        (_stages(((0, 6), "local")), 5, "stage 0 ends at block 6 but the model has only 5 blocks"),
        (_stages(((0, 4), "local")), 5, r"last stage ends at block 4 .*add a stage \[4, 5\)"),
        (
            _stages(((0, 2), "pi"), ((2, 3), "local"), ((3, 5), "pi")),
            5,
            "stage 2 and stage 0 both run on device 'pi'",
        ),
    ],
)
def test_validate_plan_errors(stages, num_blocks, pattern):
    plan = _plan(stages=stages, num_blocks=num_blocks)
    with pytest.raises(PlanError, match=pattern):
        validate_plan(plan, num_blocks)


def test_validate_plan_accepts_shared_local_and_checks_threads_and_block_count():
    plan = _plan()
    validate_plan(plan, 5)
    with pytest.raises(
        PlanError, match="made for 5 blocks but the sliced model has 6; re-run `layerline configure`"
    ):
        validate_plan(plan, 6)
    threads = _plan(stages=(PlanStage((0, 5), threads=0),))
    with pytest.raises(PlanError, match="stage 0 has threads=0; use a positive number"):
        validate_plan(threads, 5)
