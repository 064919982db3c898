"""The local engine with real worker processes, a real gateway process and real sockets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.stages import resolve_target
from layerline.engines.state import deployment_dir, list_deployments
from layerline.errors import DeploymentExists, EngineError, FormatError, PlanError
from layerline.examples import EXAMPLES, build_example
from layerline.graph import slice_model
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient


@pytest.fixture(scope="module")
def tiny_vgg(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("vgg")
    model = build_example("vgg16-tiny", work / "vgg16-tiny.onnx")
    slice_model(model, work / "vgg.sliced", name="vgg16-tiny")
    return model, work / "vgg.sliced"


def _monolithic(model: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = open_session(model)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))


def test_deploy_predict_status_down(tiny_vgg):
    model, sliced = tiny_vgg
    engine = LocalEngine()
    port = processes.free_port()
    state = engine.deploy(resolve_target(sliced, 3), DeploySettings(name="t1", port=port))
    try:
        status = engine.status("t1")
        assert status.ready, status.detail
        roles = [p.role for p in status.processes]
        assert roles == ["stage0", "stage1", "stage2", "gateway"]
        assert all(p.running for p in status.processes)
        assert [p.health for p in status.processes] == ["ready", "ready", "ready", "serving"]
        inputs = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(1))
        got = GatewayClient(state.url).infer(inputs)
        for name, expected in _monolithic(model, inputs).items():
            np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)
        # a second deployment on the same port is refused, and the first keeps serving
        with pytest.raises(DeploymentExists, match=f"port {port}"):
            engine.deploy(resolve_target(sliced, 2), DeploySettings(name="t2", port=port))
        with pytest.raises(DeploymentExists, match="already running"):
            engine.deploy(resolve_target(sliced, 2), DeploySettings(name="t1", port=processes.free_port()))
        assert GatewayClient(state.url).ready()
    finally:
        engine.down("t1")
    pids = [p.pid for p in state.processes]
    assert not any(processes.is_running(p) for p in pids)
    assert not deployment_dir("t1").exists()
    assert list_deployments() == []
    assert not processes.port_in_use("127.0.0.1", port)  # the port is free again


def test_damaged_block_is_a_clear_error_and_leaves_nothing(tiny_vgg, tmp_path):
    _, sliced = tiny_vgg
    broken = tmp_path / "broken.sliced"
    shutil.copytree(sliced, broken)
    sorted(broken.glob("*.onnx"))[0].write_bytes(b"this is not an onnx file")
    with pytest.raises(FormatError, match="slice it again"):
        LocalEngine().deploy(
            resolve_target(broken, 2), DeploySettings(name="bad", port=processes.free_port())
        )
    assert list_deployments() == []
    assert not deployment_dir("bad").exists()


def _model_with_unknown_op(path: Path) -> Path:
    """MatMul → Relu → an op onnxruntime does not implement → MatMul: stage 1 cannot start."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 8), dtype=np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 2), dtype=np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Mystery", ["r"], ["m"], domain="test.layerline"),
        helper.make_node("MatMul", ["m", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unknown-op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [w1, w2],
    )
    graph.value_info.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 8]))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.layerline", 1)]
    )
    onnx.save(model, path)
    return path


def test_stage_that_cannot_start_reports_its_own_error_and_leaves_nothing(tmp_path):
    model = _model_with_unknown_op(tmp_path / "unknown.onnx")
    manifest = slice_model(model, tmp_path / "unknown.sliced", granularity="op")
    assert len(manifest.blocks) >= 2
    with pytest.raises(EngineError) as info:
        LocalEngine().deploy(
            resolve_target(tmp_path / "unknown.sliced", len(manifest.blocks)),
            DeploySettings(name="bad", port=processes.free_port(), ready_timeout_s=60),
        )
    message = str(info.value)
    assert "exited during start-up" in message
    assert "Mystery" in message  # onnxruntime's own words reach the user
    assert list_deployments() == []
    assert not deployment_dir("bad").exists()


def test_too_many_stages_is_a_clear_error(tiny_vgg):
    _, sliced = tiny_vgg
    with pytest.raises(PlanError, match="--stages"):
        resolve_target(sliced, 10_000)


def test_deploy_from_a_plan_file(tiny_vgg, tmp_path):
    """A plan file fixes the block ranges; the deployment follows it and still equals the monolithic model."""
    from layerline.graph import Manifest
    from layerline.plan import Plan, PlanStage, save_plan

    model, sliced = tiny_vgg
    n = Manifest.load(sliced).num_blocks
    plan = Plan(
        model_name="vgg16-tiny",
        sliced=str(sliced),
        stages=(PlanStage((0, 1)), PlanStage((1, n - 1)), PlanStage((n - 1, n))),
        num_blocks=n,
    )
    save_plan(plan, tmp_path / "vgg.plan.json")
    target = resolve_target(tmp_path / "vgg.plan.json", None)
    assert target.ranges == ((0, 1), (1, n - 1), (n - 1, n))
    with pytest.raises(PlanError, match="drop --stages"):
        resolve_target(tmp_path / "vgg.plan.json", 2)
    engine = LocalEngine()
    state = engine.deploy(target, DeploySettings(name="planned", port=processes.free_port()))
    try:
        stages = engine.status("planned").state.stages
        assert [s["blocks"] for s in stages] == [[0, 1], [1, n - 1], [n - 1, n]]
        inputs = EXAMPLES["vgg16-tiny"].sample_inputs(1, np.random.default_rng(3))
        got = GatewayClient(state.url).infer(inputs)
        for name, expected in _monolithic(model, inputs).items():
            np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)
    finally:
        engine.down("planned")


def test_plan_that_does_not_cover_the_model_is_refused(tiny_vgg, tmp_path):
    from layerline.plan import Plan, PlanStage, save_plan

    _, sliced = tiny_vgg
    plan = Plan(model_name="x", sliced=str(sliced), stages=(PlanStage((0, 2)),), num_blocks=2)
    save_plan(plan, tmp_path / "short.plan.json")
    with pytest.raises(PlanError):
        resolve_target(tmp_path / "short.plan.json", None)
