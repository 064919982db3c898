"""The service command lines of a swarm deployment, and the plan's memory reaching them (no docker)."""

from __future__ import annotations

import json
from pathlib import Path

from layerline.engines.stages import resolve_target
from layerline.engines.swarm.services import artifact_service, gateway_service, stage_service
from layerline.examples import build_example
from layerline.graph import Manifest, slice_model


def _flag(args: tuple[str, ...], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_stage_service_is_pinned_labelled_fetches_then_runs_the_worker(tmp_path):
    root = tmp_path / "dep"
    spec = stage_service(
        "d", 1, "img:1", "node123", root, ["stages/stage1.json", "stages/stage1.onnx"],
        root / "stages/stage1.json", "http://10.0.0.1:8767", limit_cpu=0.5, replicas=3, grace_s=25,
        reserve_memory=123_456_789,
    )  # fmt: skip
    args = spec.args
    assert spec.name == "layerline-d-stage1" and spec.node_id == "node123"
    assert _flag(args, "--constraint") == ["node.id==node123"]
    assert "layerline.deployment=d" in _flag(args, "--label") and "layerline.stage=1" in _flag(
        args, "--label"
    )
    assert _flag(args, "--network") == ["host"] and _flag(args, "--replicas") == ["3"]
    assert _flag(args, "--stop-grace-period") == ["25s"]
    assert _flag(args, "--limit-cpu") == ["0.5"] and _flag(args, "--reserve-memory") == ["123456789"]
    tail = list(args[args.index("img:1") + 1 :])
    assert tail[:2] == ["-m", "layerline.engines.swarm.fetch"]
    assert _flag(tuple(tail), "--file") == ["stages/stage1.json", "stages/stage1.onnx"]
    assert tail[tail.index("--") + 1 :] == [
        "python3", "-m", "layerline.runtime.worker", "--config", str(root / "stages/stage1.json")
    ]  # fmt: skip
    assert "--mount" not in args  # only the artifact service sees the deployment directory


def test_gateway_has_a_health_check_and_artifacts_a_readonly_mount(tmp_path):
    root = tmp_path / "dep"
    gw = gateway_service("d", "gw:1", "n1", root, root / "gateway.json", "http://a:1", "http://10.0.0.2:8765")
    (cmd,) = _flag(gw.args, "--health-cmd")
    assert "http://10.0.0.2:8765/v2/health/live" in cmd and _flag(gw.args, "--health-interval") == ["5s"]
    art = artifact_service("d", "img:1", "mgr", root, "10.0.0.1", 8767)
    assert _flag(art.args, "--mount") == [f"type=bind,source={root},target={root},readonly"]
    assert _flag(art.args, "--listen") == ["10.0.0.1:8767"]


def test_a_plans_predicted_memory_reaches_the_target(tmp_path):
    model = build_example("vgg16-tiny", tmp_path / "m.onnx")
    slice_model(model, tmp_path / "m.sliced", name="m")
    n = Manifest.load(tmp_path / "m.sliced").num_blocks
    plan = {
        "format": "layerline.plan", "format_version": 1, "model_name": "m", "sliced": "m.sliced",
        "num_blocks": n, "objective": "latency", "created_by": "test",
        "stages": [{"blocks": [0, 2], "device": "a"}, {"blocks": [2, n], "device": "b"}],
        "predicted": {"source": "a", "stages": [{"memory_bytes": 1000}, {"memory_bytes": 2000}]},
    }  # fmt: skip
    path = Path(tmp_path / "m.plan.json")
    path.write_text(json.dumps(plan))
    target = resolve_target(path, None)
    assert target.memory_bytes == (1000, 2000) and target.source_device == "a"
    plan["predicted"] = {"source": "a"}
    path.write_text(json.dumps(plan))
    assert resolve_target(path, None).memory_bytes == ()
