"""Deploying a plan on a cluster's devices: cpu groups for quotas, threads, unknown devices."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from engines_support import relu_chain

from layerline.cli.main import main
from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.placement import benchmark_threads, place
from layerline.engines.stages import resolve_target
from layerline.engines.state import deployment_dir, list_deployments, load_state
from layerline.errors import EngineError, PlanError
from layerline.graph import Manifest, slice_model
from layerline.plan import Plan, PlanStage, save_plan
from layerline.profile.cgroup import PERIOD_US, cgroup_cpu_root
from layerline.profile.cluster import DeviceSpec, parse_cluster
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient

WIDTH = 32


def _cgroup_usable() -> bool:
    root = cgroup_cpu_root()
    return (root / "cpu.cfs_quota_us").is_file() and os.geteuid() == 0 and os.access(root, os.W_OK)


needs_cgroup = pytest.mark.skipif(
    not _cgroup_usable(), reason="needs root and a writable cgroup v1 cpu controller"
)


def _chain(layers: int = 3) -> onnx.ModelProto:
    return relu_chain(layers, WIDTH)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[onnx.ModelProto, Path]:
    model = _chain()
    sliced = tmp_path_factory.mktemp("placement") / "chain.sliced"
    slice_model(model, sliced, name="chain")
    return model, sliced


def _plan(sliced: Path, path: Path, devices: tuple[str, str], source: str) -> Path:
    n = Manifest.load(sliced).num_blocks
    assert n >= 2
    cut = n // 2
    plan = Plan(
        model_name="chain",
        sliced=str(sliced),
        stages=(PlanStage((0, cut), devices[0]), PlanStage((cut, n), devices[1])),
        num_blocks=n,
        predicted={"latency_s": 0.001, "source": source},
    )
    save_plan(plan, path)
    return path


def _cpu_cgroup(pid: int) -> str:
    """The cpu hierarchy's group path of ``pid`` from /proc/PID/cgroup ('/' for the root)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return group
    raise AssertionError(f"no cpu hierarchy in /proc/{pid}/cgroup")


def _groups(tag: str) -> list[Path]:
    return sorted(cgroup_cpu_root().glob(f"layerline-deploy-*{tag}*"))


@needs_cgroup
def test_quota_devices_run_their_workers_and_gateway_in_cpu_groups(chain, tmp_path):
    model, sliced = chain
    tag = f"p{os.getpid()}"
    edge, server = f"edge{tag}", f"server{tag}"
    cluster = parse_cluster(
        f"devices:\n  - name: {edge}\n    cpu_quota: 0.5\n  - name: {server}\n  - name: spare{tag}\n"
    )
    target = resolve_target(_plan(sliced, tmp_path / "p.json", (edge, server), edge), None)
    engine = LocalEngine()
    state = engine.deploy(
        target, DeploySettings(name=f"pl{tag}", port=processes.free_port()), cluster=cluster
    )
    try:
        pids = {p.role: p.pid for p in state.processes}
        groups = state.extra["cgroups"]
        assert list(groups) == [edge]  # only the device with a quota gets a group
        group = Path(groups[edge])
        assert group.parent == cgroup_cpu_root() and group.is_dir()
        assert (group / "cpu.cfs_period_us").read_text().strip() == str(PERIOD_US)
        assert (group / "cpu.cfs_quota_us").read_text().strip() == str(PERIOD_US // 2)
        members = (group / "cgroup.procs").read_text().split()
        # the edge stage and the gateway (the source is the edge) are in it; the server stage is not
        assert str(pids["stage0"]) in members and str(pids["gateway"]) in members
        assert str(pids["stage1"]) not in members
        assert _cpu_cgroup(pids["stage0"]) == f"/{group.name}"
        assert _cpu_cgroup(pids["stage1"]) != f"/{group.name}"
        assert [(s["device"], s["cpu_quota"], s["threads"]) for s in load_state(f"pl{tag}").stages] == [
            (edge, 0.5, 1),
            (server, None, benchmark_threads(DeviceSpec(server))),
        ]
        x = np.random.default_rng(3).standard_normal((2, WIDTH)).astype(np.float32)
        got = GatewayClient(state.url).infer({"x": x})
        (expected,) = open_session(model.SerializeToString()).run(None, {"x": x})
        np.testing.assert_allclose(next(iter(got.values())), expected, rtol=1e-5, atol=1e-6)
    finally:
        engine.down(f"pl{tag}")
    assert not group.exists()
    assert not any(processes.is_running(p) for p in pids.values())
    assert f"pl{tag}" not in list_deployments()


@needs_cgroup
def test_unknown_device_is_refused_before_anything_starts(chain, tmp_path, capsys):
    _, sliced = chain
    tag = f"u{os.getpid()}"
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(f"devices:\n  - name: a{tag}\n    cpu_quota: 0.5\n  - name: b{tag}\n")
    plan = _plan(sliced, tmp_path / "p.json", (f"a{tag}", "ghost"), f"a{tag}")
    port = processes.free_port()
    with pytest.raises(
        PlanError, match=rf"'ghost' that the cluster does not have; its devices are a{tag}, b{tag}"
    ):
        LocalEngine().deploy(
            resolve_target(plan, None),
            DeploySettings(name=f"un{tag}", port=port),
            cluster=parse_cluster(cluster_file.read_text()),
        )
    # the CLI says the same and leaves nothing behind
    rc = main(
        ["deploy", str(plan), "--cluster", str(cluster_file), "--name", f"un{tag}", "--port", str(port)]
    )
    assert rc != 0
    assert "ghost" in capsys.readouterr().err
    assert list_deployments() == [] and not deployment_dir(f"un{tag}").exists()
    assert _groups(tag) == []
    assert not processes.port_in_use("127.0.0.1", port)


def test_unenforceable_quota_is_refused_before_anything_starts(chain, tmp_path):
    _, sliced = chain
    cluster = parse_cluster("devices:\n  - name: a\n    cpu_quota: 0.5\n  - name: b\n")
    target = resolve_target(_plan(sliced, tmp_path / "p.json", ("a", "b"), "a"), None)
    with pytest.raises(EngineError, match=r"device 'a' asks for cpu_quota=0.5 but there is no cgroup v1 cpu"):
        LocalEngine().deploy(
            target,
            DeploySettings(name="nq", port=processes.free_port()),
            cluster=cluster,
            cgroup_root=tmp_path / "no-cgroup",
        )
    assert list_deployments() == [] and not deployment_dir("nq").exists()


def test_place_threads_and_label_warning(chain, tmp_path):
    _, sliced = chain
    target = resolve_target(_plan(sliced, tmp_path / "p.json", ("cam", "srv"), "cam"), None)
    assert target.source_device == "cam" and target.threads == (None, None)
    # no cluster: devices are labels; the warning says how to pass one
    placed = place(target, None, cores=4)
    assert (
        len(placed.warnings) == 1 and "--cluster" in placed.warnings[0] and "cam, srv" in placed.warnings[0]
    )
    assert [s.threads for s in placed.stages] == [4, 4] and placed.gateway.name == "cam"
    # with a cluster: the benchmark's rule per device, unless --threads says otherwise
    cluster = parse_cluster(
        "devices:\n  - name: cam\n    cpu_quota: 0.35\n  - name: srv\n    cpu_quota: 1.5\n"
    )
    placed = place(target, cluster, cores=4)
    assert placed.warnings == () and [s.threads for s in placed.stages] == [1, 2]
    assert placed.quotas == {"cam": 0.35, "srv": 1.5}
    assert [s.threads for s in place(target, cluster, threads=3, cores=4).stages] == [3, 3]
    assert benchmark_threads(DeviceSpec("x", cpu_quota=8.0), cores=2) == 2
    # a plain balanced split keeps one thread per stage and no warning
    balanced = place(resolve_target(sliced, 2), None)
    assert [s.threads for s in balanced.stages] == [1, 1] and balanced.warnings == ()
    # the source must be in the cluster too
    with pytest.raises(PlanError, match="'elsewhere'"):
        place(resolve_target(_plan(sliced, tmp_path / "q.json", ("cam", "srv"), "elsewhere"), None), cluster)
