"""The swarm engine on a real single-node Docker Swarm (private dockerd; see conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from layerline.engines import processes
from layerline.engines.local import DeploySettings
from layerline.engines.stages import resolve_target
from layerline.engines.state import deployment_dir
from layerline.engines.swarm import LABEL, SwarmEngine
from layerline.errors import DeploymentExists, EngineError
from layerline.examples import EXAMPLES, build_example
from layerline.graph import slice_model
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_vgg(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("vgg")
    model = build_example("vgg16-tiny", work / "vgg16-tiny.onnx")
    slice_model(model, work / "vgg.sliced", name="vgg16-tiny")
    return model, work / "vgg.sliced"


def _labelled(docker, kind: str, name: str) -> list[str]:
    return docker.run([kind, "ls", "-q", "--filter", f"label={LABEL}={name}"]).split()


def test_deploy_three_stages_predict_status_down(
    swarm_docker, worker_image, gateway_image, tiny_vgg, swarm_timings
):
    model, sliced = tiny_vgg
    engine = SwarmEngine(docker_host=swarm_docker.host, image=worker_image, gateway_image=gateway_image)
    settings = DeploySettings(name="sw1", port=processes.free_port(), ready_timeout_s=120)
    t0 = time.monotonic()
    state = engine.deploy(resolve_target(sliced, 3), settings)
    swarm_timings["deploy (3 stages)"] = time.monotonic() - t0
    try:
        assert len(_labelled(swarm_docker, "service", "sw1")) == 5  # artifacts, 3 stages, gateway
        status = engine.status("sw1")
        assert status.ready, status.detail
        deadline = time.monotonic() + 20  # docker counts the gateway as running once its health check passed
        while next(s for s in status.services if s.role == "gateway").running != 1:
            assert time.monotonic() < deadline, status.services
            time.sleep(0.5)
            status = engine.status("sw1")
        assert [(s.role, s.running, s.desired) for s in status.services] == [
            ("stage0", 1, 1), ("stage1", 1, 1), ("stage2", 1, 1), ("gateway", 1, 1), ("artifacts", 1, 1)
        ]  # fmt: skip
        assert not state.processes  # nothing runs outside the swarm
        node = swarm_docker.swarm_node()[0]
        for service in state.extra["services"]:
            spec = swarm_docker.run(
                ["service", "inspect", "--format", "{{json .Spec.TaskTemplate}}", service]
            )
            assert f"node.id=={node}" in spec
            # only the artifact service sees the deployment directory; the others fetched their files
            assert ('"Type":"bind"' in spec) == service.endswith("-artifacts"), service
        inputs = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(1))
        got = GatewayClient(state.url).infer(inputs)
        session = open_session(model)
        expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))
        for name, want in expected.items():
            atol = 1e-6 * max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=atol)
        # the same name again is refused before anything is created, and the first keeps serving
        with pytest.raises(DeploymentExists, match="sw1"):
            engine.deploy(resolve_target(sliced, 2), DeploySettings(name="sw1", port=processes.free_port()))
        assert len(_labelled(swarm_docker, "service", "sw1")) == 5
        assert GatewayClient(state.url).ready()
    finally:
        engine.down("sw1")
    assert _labelled(swarm_docker, "service", "sw1") == []
    assert _labelled(swarm_docker, "config", "sw1") == []
    assert not swarm_docker.run(["ps", "-aq", "--filter", f"label={LABEL}=sw1"]).strip()
    assert not deployment_dir("sw1").exists()


def test_missing_image_is_a_clear_error_and_creates_nothing(swarm_docker, tiny_vgg):
    _, sliced = tiny_vgg
    engine = SwarmEngine(docker_host=swarm_docker.host, image="layerline-worker:absent")
    with pytest.raises(EngineError, match=r"layerline-worker:absent.*layerline image build"):
        engine.deploy(resolve_target(sliced, 2), DeploySettings(name="sw2", port=processes.free_port()))
    assert _labelled(swarm_docker, "service", "sw2") == []
    assert not deployment_dir("sw2").exists()


def test_failing_stage_stops_deploy_with_its_log_and_leaves_nothing(
    swarm_docker, worker_image, gateway_image, tiny_vgg, tmp_path
):
    _, sliced = tiny_vgg
    # python3 works (the fetch step and the artifact service run), but the worker itself refuses to start
    (tmp_path / "python3").write_text(
        '#!/bin/sh\nif [ "$1 $2" = "-m layerline.runtime.worker" ]; then\n'
        "  echo stage refuses to start; exit 3\nfi\n"
        'exec /usr/bin/python3 "$@"\n'
    )
    (tmp_path / "Dockerfile").write_text(
        f"FROM {worker_image}\nCOPY python3 /usr/local/bin/python3\nRUN chmod +x /usr/local/bin/python3\n"
    )
    swarm_docker.run(
        ["build", "-q", "-t", "layerline-worker:broken", str(tmp_path)], env={"DOCKER_BUILDKIT": "0"}
    )
    engine = SwarmEngine(docker_host=swarm_docker.host, image="layerline-worker:broken")
    with pytest.raises(EngineError, match=r"(?s)stage \d .*failed to start.*stage refuses to start"):
        engine.deploy(resolve_target(sliced, 1), DeploySettings(name="sw3", port=processes.free_port()))
    assert _labelled(swarm_docker, "service", "sw3") == []
    assert not swarm_docker.run(["ps", "-aq", "--filter", f"label={LABEL}=sw3"]).strip()
    assert not deployment_dir("sw3").exists()


def test_cli_deploy_status_down_on_the_swarm(swarm_docker, worker_image, gateway_image, tiny_vgg, tmp_path):
    """`layerline deploy --engine swarm`; `status --json` and `down` find the swarm engine by the state."""
    import json
    import subprocess
    import sys

    _, sliced = tiny_vgg

    def layerline(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "layerline.cli.main", *args], capture_output=True, text=True, timeout=300
        )

    port = processes.free_port()
    out = layerline(
        "deploy", str(sliced), "--stages", "2", "--engine", "swarm", "--name", "swcli", "--port", str(port),
        "--image", worker_image, "--docker-host", swarm_docker.host,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    try:
        assert len(_labelled(swarm_docker, "service", "swcli")) == 4
        doc = json.loads(layerline("status", "--name", "swcli", "--json").stdout)
        (dep,) = doc["deployments"]
        assert dep["engine"] == "swarm" and dep["ready"]
        replicas = {s["role"]: s["replicas"] for s in dep["services"]}
        assert replicas["stage0"] == replicas["stage1"] == replicas["artifacts"] == "1/1", replicas
        x = EXAMPLES["vgg16-tiny"].sample_inputs(1, np.random.default_rng(5))["input"]
        np.save(tmp_path / "x.npy", x)
        assert layerline("predict", str(tmp_path / "x.npy"), "--name", "swcli").returncode == 0
    finally:
        down = layerline("down", "--name", "swcli")
    assert down.returncode == 0, down.stderr
    assert _labelled(swarm_docker, "service", "swcli") == []
    assert not deployment_dir("swcli").exists()


def test_nodes_map_devices_by_label_or_hostname(swarm_docker):
    from layerline.engines.swarm.agents import swarm_cluster
    from layerline.engines.swarm.nodes import DEVICE_LABEL, list_nodes, map_devices, node_for_device

    (node,) = list_nodes(swarm_docker)
    assert node.usable and node.role == "manager" and node.address == "127.0.0.1"
    assert node_for_device([node], node.hostname) == node
    with pytest.raises(
        EngineError, match=rf"no swarm node for device 'edge1'.*--label-add {DEVICE_LABEL}=edge1"
    ):
        node_for_device([node], "edge1")
    swarm_docker.run(["node", "update", "--label-add", f"{DEVICE_LABEL}=edge1", node.id])
    try:
        (labelled,) = list_nodes(swarm_docker)
        assert labelled.device == "edge1"
        assert map_devices([labelled], ["edge1", "edge1"]) == {"edge1": labelled}
        with pytest.raises(EngineError, match="no swarm node for device"):  # the label replaces the hostname
            node_for_device([labelled], node.hostname)
        cluster = swarm_cluster(swarm_docker)
        assert [(d.name, d.engine, d.address) for d in cluster.devices] == [("edge1", "swarm", "127.0.0.1")]
        with pytest.raises(EngineError, match="no ready swarm node for device"):
            swarm_cluster(swarm_docker, ["edge2"])
    finally:
        swarm_docker.run(["node", "update", "--label-rm", DEVICE_LABEL, node.id])
