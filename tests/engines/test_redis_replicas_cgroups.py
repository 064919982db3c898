"""Every replica of a stage on a device with a cpu quota runs in that device's cpu group, including the
replicas `scale` starts later from another process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from engines_support import relu_chain

from layerline.autoscale.local_scaler import LocalReplicaScaler
from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.stages import DeployTarget
from layerline.engines.state import load_state
from layerline.graph import slice_model
from layerline.profile.cgroup import cgroup_cpu_root
from layerline.profile.cluster import parse_cluster
from layerline.runtime.redis_server import redis_server_binary
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient

WIDTH = 32


def _cgroup_usable() -> bool:
    root = cgroup_cpu_root()
    return (root / "cpu.cfs_quota_us").is_file() and os.geteuid() == 0 and os.access(root, os.W_OK)


pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
    pytest.mark.skipif(not _cgroup_usable(), reason="needs root and a writable cgroup v1 cpu controller"),
]


def _chain(path: Path) -> onnx.ModelProto:
    model = relu_chain(2, WIDTH)
    onnx.save(model, path)
    return model


def _cpu_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return group
    raise AssertionError(f"no cpu hierarchy in /proc/{pid}/cgroup")


def test_replicas_join_their_devices_cpu_group(tmp_path):
    model = _chain(tmp_path / "chain.onnx")
    manifest = slice_model(tmp_path / "chain.onnx", tmp_path / "chain.sliced", name="chain")
    n = len(manifest.blocks)
    tag = f"q{os.getpid()}"
    edge, server = f"edge{tag}", f"server{tag}"
    cluster = parse_cluster(f"devices:\n  - name: {edge}\n    cpu_quota: 0.5\n  - name: {server}\n")
    target = DeployTarget(tmp_path / "chain.sliced", ((0, n // 2), (n // 2, n)), (edge, server), "plan")
    name = f"rq{tag}"
    engine = LocalEngine()
    settings = DeploySettings(name=name, port=processes.free_port(), transport="redis", replicas=(2, 1))
    state = engine.deploy(target, settings, cluster=cluster)
    try:
        group = Path(state.extra["cgroups"][edge])
        assert list(state.extra["cgroups"]) == [edge]
        LocalReplicaScaler(name).scale(0, 3)
        LocalReplicaScaler(name).scale(1, 2)
        now = load_state(name)
        edge_pids = [p.pid for p in now.replica_records(0)]
        server_pids = [p.pid for p in now.replica_records(1)]
        assert len(edge_pids) == 3 and len(server_pids) == 2
        assert all(_cpu_cgroup(pid) == f"/{group.name}" for pid in edge_pids)
        assert all(_cpu_cgroup(pid) != f"/{group.name}" for pid in server_pids)
        x = np.random.default_rng(3).standard_normal((2, WIDTH)).astype(np.float32)
        got = GatewayClient(state.url).infer({"x": x})
        (expected,) = open_session(model.SerializeToString()).run(None, {"x": x})
        np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-5, atol=1e-6)
    finally:
        engine.down(name)
    assert not group.exists()
    assert not any(processes.is_running(p) for p in edge_pids + server_pids)
