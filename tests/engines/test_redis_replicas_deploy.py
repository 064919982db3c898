"""Replicas per stage in the local engine: deploy --replicas, `layerline scale` from another process,
status, refusals, a replica that cannot start, and `down` of everything (recorded or not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from layerline.autoscale.local_scaler import LocalReplicaScaler, start_replica
from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.stages import resolve_target
from layerline.engines.state import deployment_dir, list_deployments, load_state
from layerline.errors import EngineError
from layerline.examples import EXAMPLES, build_example
from layerline.graph import slice_model
from layerline.runtime.redis_server import redis_server_binary
from layerline.runtime.scaling import ReplicaScaler
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient

NEEDS_REDIS = [
    pytest.mark.redis,
    pytest.mark.skipif(
        redis_server_binary() is None, reason="redis-server is not installed (apt-get install redis-server)"
    ),
]


@pytest.fixture(scope="module")
def tiny_vgg(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("vgg")
    model = build_example("vgg16-tiny", work / "vgg16-tiny.onnx")
    slice_model(model, work / "vgg.sliced", name="vgg16-tiny")
    return model, work / "vgg.sliced"


def layerline(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerline.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def _check_predictions(url: str, model: Path, seeds: range) -> None:
    session = open_session(model)
    names = [o.name for o in session.get_outputs()]
    client = GatewayClient(url)
    for seed in seeds:
        inputs = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(seed))
        got = client.infer(inputs)
        for name, expected in zip(names, session.run(None, inputs), strict=True):
            np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)


def _replicas(name: str) -> list[tuple[int, int]]:
    out = layerline("status", "--name", name, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    (dep,) = json.loads(out.stdout)["deployments"]
    return [(r["running"], r["desired"]) for r in dep["replicas"]]


def test_tcp_refuses_replicas_and_autoscaling_before_starting_anything(tiny_vgg, tmp_path):
    _, sliced = tiny_vgg
    out = layerline("deploy", str(sliced), "--stages", "3", "--replicas", "1,2,1")
    assert out.returncode == 2
    assert "the TCP transport runs exactly one worker per stage" in out.stderr
    assert "add --transport redis" in out.stderr
    out = layerline("deploy", str(sliced), "--stages", "3", "--autoscale")
    assert out.returncode == 2 and "--autoscale scales on the stages' Redis streams" in out.stderr
    out = layerline("deploy", str(sliced), "--stages", "3", "--transport", "redis", "--max", "3")
    assert out.returncode == 2 and "--max set(s) the autoscaler: add --autoscale" in out.stderr
    out = layerline("deploy", str(sliced), "--stages", "3", "--transport", "redis", "--replicas", "1,2")
    assert out.returncode == 2 and "2 counts for 3 stages" in out.stderr
    settings = DeploySettings(name="t", port=processes.free_port(), replicas=(1, 2, 1))
    with pytest.raises(EngineError, match="TCP transport runs exactly one worker"):
        LocalEngine().deploy(resolve_target(sliced, 3), settings)
    assert list_deployments() == []
    out = layerline("scale", "1=2")
    assert out.returncode == 1 and "no deployment runs" in out.stderr
    out = layerline("scale", "one=2")
    assert out.returncode == 2 and "write STAGE=N" in out.stderr


@pytest.mark.slow
@NEEDS_REDIS[0]
@NEEDS_REDIS[1]
def test_replicas_deploy_scale_from_the_cli_and_down(tiny_vgg):
    model, sliced = tiny_vgg
    engine = LocalEngine()
    settings = DeploySettings(name="rr", port=processes.free_port(), transport="redis", replicas=(1, 2, 1))
    state = engine.deploy(resolve_target(sliced, 3), settings)
    try:
        status = engine.status("rr")
        assert status.ready, status.detail
        assert [p.role for p in status.processes] == [
            "redis", "stage0.r0", "stage1.r0", "stage1.r1", "stage2.r0", "gateway",
        ]  # fmt: skip
        assert [(r.running, r.desired) for r in status.replicas] == [(1, 1), (2, 2), (1, 1)]
        assert [p.blocks for p in status.processes[2:4]] == [status.processes[2].blocks] * 2
        assert state.stages[1]["replicas"] == 2
        _check_predictions(state.url, model, range(4))

        # `layerline scale` in another process: up to 3 (it returns once the new one consumes) ...
        out = layerline("scale", "1=3", "--name", "rr")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "stage 1: 2 → 3 replicas" in out.stdout
        assert _replicas("rr") == [(1, 1), (3, 3), (1, 1)]
        table = layerline("status", "--name", "rr")
        assert table.returncode == 0 and "stage1.r2" in table.stdout and "3/3" in table.stdout
        _check_predictions(state.url, model, range(4, 8))
        before = load_state("rr").replica_records(1)
        assert [p.role for p in before] == ["stage1.r0", "stage1.r1", "stage1.r2"]

        # ... and down to 1: the newest two stop gracefully (drained), the oldest keeps serving
        out = layerline("scale", "1=1", "0=2", "--name", "rr")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "stage 1: 3 → 1 replicas" in out.stdout and "stage 0: 1 → 2 replicas" in out.stdout
        assert _replicas("rr") == [(2, 2), (1, 1), (1, 1)]
        after = load_state("rr").replica_records(1)
        assert after == before[:1]
        for gone in before[1:]:
            assert not processes.is_running(gone.pid)
            assert "stage 1 stopped (served" in Path(gone.log).read_text()
        _check_predictions(state.url, model, range(8, 10))

        # a replica that cannot start: the error names its log, the others keep serving
        scaler = LocalReplicaScaler("rr")
        assert isinstance(scaler, ReplicaScaler) and scaler.stage_count == 3
        config = deployment_dir("rr") / "stages" / "stage2.json"
        good = config.read_text()
        config.write_text("{not json")
        try:
            with pytest.raises(EngineError, match=r"stage 2 replica stage2.r1 exited while starting"):
                scaler.scale(2, 2, timeout_s=30)
        finally:
            config.write_text(good)
        assert (scaler.replicas(2), scaler.desired(2)) == (1, 1)
        with pytest.raises(ValueError, match="stage 3 does not exist"):
            scaler.scale(3, 1)
        _check_predictions(state.url, model, range(10, 11))

        # a replica nobody recorded (its scaler died before writing the state) is stopped by down too
        stray = start_replica(deployment_dir("rr"), 1, 9)
    finally:
        engine.down("rr")
    pids = [p.pid for p in state.processes] + [p.pid for p in before] + [stray.pid]
    assert not any(processes.is_running(p) for p in pids)
    assert list_deployments() == []


@pytest.mark.slow
@NEEDS_REDIS[0]
@NEEDS_REDIS[1]
def test_deploy_autoscale_from_the_cli(tiny_vgg):
    _, sliced = tiny_vgg
    port = str(processes.free_port())
    out = layerline(
        "deploy", str(sliced), "--stages", "3", "--transport", "redis", "--name", "ac", "--port", port,
        "--autoscale", "--min", "1,0,1", "--max", "1,2,1", "--target", "8", "--down-delay", "30",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        state = load_state("ac")
        assert [p.role for p in state.processes][-1] == "autoscaler"
        config = state.extra["autoscale"]
        assert [(s["min_replicas"], s["max_replicas"], s["target"]) for s in config["stages"]] == [
            (1, 1, 8.0), (0, 2, 8.0), (1, 1, 8.0),
        ]  # fmt: skip
        assert config["metrics_url"] in out.stdout  # the status table's header names it
        assert _replicas("ac") == [(1, 1), (1, 1), (1, 1)]  # min 0 still starts with one replica
        with urllib.request.urlopen(config["metrics_url"], timeout=5) as resp:
            assert 'layerline_autoscale_replicas_running{stage="1"} 1.0' in resp.read().decode()
        again = layerline("autoscale", "--name", "ac")
        assert again.returncode == 1 and "already has an autoscaler" in again.stderr
        scaled = layerline("scale", "1=2", "--name", "ac")
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr
        assert "keeps adjusting the counts within its bounds (0: 1..1, 1: 0..2, 2: 1..1)" in scaled.stdout
        assert LocalReplicaScaler("ac").replicas(1) == 2
    finally:
        down = layerline("down", "--name", "ac")
    assert down.returncode == 0, down.stderr
    assert not any(processes.is_running(p.pid) for p in state.processes)
    assert list_deployments() == []
