"""The swarm engine across a real 3-node swarm on the emulated testbed: each stage on its own node, the
gateway on the source node, stage files fetched from the manager, and a node cut off the network.

Needs root, cgroup v1, docker.io and debootstrap (the worker image is built on the testbed's manager daemon
from the cached bookworm base). Marked testbed + swarm + slow.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from testbed_support import up_when_free

from layerline.engines.local import DeploySettings
from layerline.engines.stages import resolve_target
from layerline.engines.swarm import SwarmEngine
from layerline.engines.swarm.agents import SwarmAgents, swarm_cluster
from layerline.engines.swarm.docker import DockerCli
from layerline.engines.swarm.replan import heal
from layerline.engines.swarm.testbase import ensure_test_images
from layerline.errors import StageUnavailable
from layerline.examples import EXAMPLES, build_example
from layerline.graph import Manifest, slice_model
from layerline.plan.format import Plan, PlanStage, save_plan
from layerline.profile import BenchmarkOptions, run_benchmark, save_profile
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient
from layerline.testbed import FleetSpec, docker_host, down, load_image
from layerline.testbed.host import missing_docker, missing_requirements

_MISSING = missing_requirements() + missing_docker()
pytestmark = [
    pytest.mark.testbed,
    pytest.mark.swarm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason="; ".join(_MISSING) or "ok"),
]

FLEET = {
    "name": "swarm-deploy",
    "link": {"rate": "200mbit", "delay": "1ms"},
    "devices": [
        {"name": "n1", "cpu": 1.0, "memory": "1G", "swarm": True},
        {"name": "n2", "cpu": 0.5, "memory": "768M", "swarm": True},
        {"name": "n3", "cpu": 0.4, "memory": "768M", "swarm": True},
    ],
}
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("swarm-deploy-home")
    t0 = time.monotonic()
    state = up_when_free(FleetSpec.from_yaml_data(FLEET), home)
    TIMES["testbed up"] = time.monotonic() - t0
    try:
        t0 = time.monotonic()
        worker, gateway = ensure_test_images(DockerCli(docker_host(state, "n1")))
        TIMES["images built on n1"] = time.monotonic() - t0
        t0 = time.monotonic()
        for tag in (worker, gateway):
            load_image(state, tag, source_docker_host=docker_host(state, "n1"))
        TIMES["images copied to n2, n3"] = time.monotonic() - t0
        yield state, worker, gateway
    finally:
        t0 = time.monotonic()
        down(home)
        print(f"testbed down (3 nodes, images and containers) {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("mn")
    model = build_example("vgg16-tiny", work / "vgg16-tiny.onnx")
    sliced = work / "vgg.sliced"
    slice_model(model, sliced, name="vgg16-tiny")
    n = Manifest.load(sliced).num_blocks
    cuts = [0, n // 3, 2 * n // 3, n]
    stages = tuple(PlanStage((cuts[i], cuts[i + 1]), dev, 1) for i, dev in enumerate(("n1", "n2", "n3")))
    path = work / "vgg.plan.json"
    save_plan(Plan("vgg16-tiny", str(sliced), stages, n, predicted={"source": "n1"}), path)
    return model, path


def _task_nodes(docker: DockerCli, service: str) -> set[str]:
    out = docker.run(["service", "ps", "--filter", "desired-state=running", "--format", "{{.Node}}", service])
    return set(out.split())


@pytest.mark.timeout(900)
def test_stages_on_three_nodes_then_a_node_is_cut_off(fleet, plan):
    state, worker, gateway = fleet
    model, plan_path = plan
    manager = docker_host(state, "n1")
    engine = SwarmEngine(docker_host=manager, image=worker, gateway_image=gateway)
    # `layerline benchmark --engine swarm`: one agent service per node, results over TCP from the agents
    sliced = Path(plan_path.parent / "vgg.sliced")
    opts = BenchmarkOptions(warmup=1, repeats=5, pings=3, transfer_repeats=1)
    docker = DockerCli(manager)
    agents = SwarmAgents(docker, worker)
    t0 = time.monotonic()
    profile = run_benchmark(sliced, swarm_cluster(docker), opts, agents=agents)
    TIMES["benchmark --engine swarm (s)"] = time.monotonic() - t0
    assert not profile.failures, profile.failures
    assert [d.name for d in profile.devices] == ["n1", "n2", "n3"]
    assert [d.address for d in profile.devices] == ["10.213.0.10", "10.213.0.11", "10.213.0.12"]
    n1_to_n3 = profile.link("n1", "n3")
    assert n1_to_n3 is not None and n1_to_n3.one_way_latency_s >= 0.0009  # 1 ms receive delay per device
    assert not docker.run(["service", "ls", "-q", "--filter", "label=layerline.benchmark"]).strip()
    assert len(profile.blocks) == 3 * Manifest.load(sliced).num_blocks
    profile_path = save_profile(profile, plan_path.parent / "vgg.profile.json")
    t0 = time.monotonic()
    dep = engine.deploy(resolve_target(plan_path, None), DeploySettings(name="mn", ready_timeout_s=240))
    TIMES["deploy (plan -> ready, 3 stages on 3 nodes)"] = time.monotonic() - t0
    try:
        assert dep.url == "http://10.213.0.10:8765"  # the gateway on the source node n1
        for i, node in enumerate(("n1", "n2", "n3")):
            assert _task_nodes(docker, f"layerline-mn-stage{i}") == {node}
        assert _task_nodes(docker, "layerline-mn-gateway") == {"n1"}
        assert _task_nodes(docker, "layerline-mn-artifacts") == {"n1"}
        status = engine.status("mn")
        assert status.ready, status.detail
        assert [(s.role, s.node) for s in status.services][:3] == [
            ("stage0", "n1"),
            ("stage1", "n2"),
            ("stage2", "n3"),
        ]

        client = GatewayClient(dep.url, timeout_s=60)
        session = open_session(model)
        names = [o.name for o in session.get_outputs()]
        latencies = []
        for seed in range(5):
            inputs = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(seed))
            t = time.perf_counter()
            got = client.infer(inputs)
            latencies.append(time.perf_counter() - t)
            for name, want in zip(names, session.run(None, inputs), strict=True):
                atol = 1e-6 * max(1.0, float(np.abs(want).max()))
                np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=atol)
        TIMES["request median (batch 2) ms"] = float(np.median(latencies)) * 1e3

        # n3 (stage 2) loses its network: requests fail fast with 503, status names the node
        n3 = state.device("n3").netns
        subprocess.run(["ip", "-n", n3, "link", "set", "eth0", "down"], check=True)
        try:
            inputs = EXAMPLES["vgg16-tiny"].sample_inputs(1, np.random.default_rng(9))
            t = time.monotonic()
            with pytest.raises(StageUnavailable):
                client.infer(inputs)
            TIMES["503 after node loss (s)"] = time.monotonic() - t
            assert TIMES["503 after node loss (s)"] < 15.0  # the request deadline is 30 s
            deadline = time.monotonic() + 60
            while True:
                status = engine.status("mn")
                stage2 = next(s for s in status.services if s.role == "stage2")
                if stage2.node_state == "down":
                    break
                assert time.monotonic() < deadline, f"the swarm never marked n3 down: {stage2}"
                time.sleep(1.0)
            TIMES["node marked down after (s)"] = time.monotonic() - t
            assert not status.ready and "n3 (down" in status.detail, status.detail

            # heal: plan again without n3 from the same profile, deploy again under the same name and port
            t = time.monotonic()
            healed = heal(engine, "mn", profile_path, plan_out=plan_path.parent / "healed.plan.json")
            TIMES["heal (re-plan + redeploy) s"] = time.monotonic() - t
            assert healed.lost == ("n3",)
            assert healed.state.url == dep.url
            assert {s["device"] for s in healed.state.stages} <= {"n1", "n2"}
            for seed in range(3):
                inputs = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(20 + seed))
                got = client.infer(inputs)
                for name, want in zip(names, session.run(None, inputs), strict=True):
                    atol = 1e-6 * max(1.0, float(np.abs(want).max()))
                    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=atol)
        finally:
            subprocess.run(["ip", "-n", n3, "link", "set", "eth0", "up"], check=True)
    finally:
        engine.down("mn")
        print("\nswarm on the testbed: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))
    assert (
        not DockerCli(manager)
        .run(["service", "ls", "-q", "--filter", "label=layerline.deployment=mn"])
        .strip()
    )
