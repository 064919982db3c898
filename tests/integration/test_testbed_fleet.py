"""benchmark → configure → deploy → predict → down on a real emulated fleet (needs root and cgroup v1).

One 3-device testbed for the module: ``fast`` (1 core, 200 Mbit), ``mid`` (0.5 core, 50 Mbit, 2 ms receive
delay), ``slow`` (0.3 core, 50 Mbit, 2 ms). Agents, stage workers and the gateway run inside the devices;
the host reaches them through its port on the fleet's bridge. The last test takes the testbed down.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from layerline.cli.main import main
from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.stages import resolve_target
from layerline.errors import EngineError
from layerline.graph import Manifest
from layerline.plan import optimize, save_plan
from layerline.plan.from_profile import problem_from_profile
from layerline.profile import BenchmarkOptions, load_cluster, load_profile, run_benchmark
from layerline.profile import testbed_devices as tbd
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient
from layerline.testbed import FleetSpec, TestbedError, down, up
from layerline.testbed.cgroups import cgroup_pids
from layerline.testbed.host import missing_requirements
from layerline.testbed.netns import netns_pids

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_requirements()), reason="; ".join(missing_requirements()) or "ok"),
]

DELAY_MS = 2.0
FLEET = {
    "name": "ltb",
    "devices": [
        {"name": "fast", "cpu": 1.0, "memory": "512M", "link": {"rate": "200mbit"}},
        {"name": "mid", "cpu": 0.5, "memory": "512M", "link": {"rate": "50mbit", "delay": f"{DELAY_MS}ms"}},
        {"name": "slow", "cpu": 0.3, "memory": "512M", "link": {"rate": "50mbit", "delay": f"{DELAY_MS}ms"}},
    ],
}
DELAYS = {"fast": 0.0, "mid": DELAY_MS / 1e3, "slow": DELAY_MS / 1e3}
BATCH = 16  # blocks long enough at this batch for the quotas to show (at batch 1 they run ~20 µs)
OPTS = BenchmarkOptions(batch_sizes=(1, BATCH), warmup=2, repeats=20, pings=10, transfer_repeats=2)


def _up(home: Path, wait_s: float = 180.0):
    """Bring the fleet up; while another testbed holds the subnet (one per host), wait for it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return up(FleetSpec.from_yaml_data(FLEET), home)
        except TestbedError as exc:
            if "already routes" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("fleet-home")
    state = _up(home)
    yield home, state
    down(home)


@pytest.fixture
def on_fleet(fleet, monkeypatch):
    """LAYERLINE_HOME points at the fleet's home, so `--testbed` and cluster files find it."""
    home, state = fleet
    monkeypatch.setenv("LAYERLINE_HOME", str(home))
    return state


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    from layerline.examples import build_example
    from layerline.graph import slice_model

    root = tmp_path_factory.mktemp("vgg16-tiny")
    onnx_path = build_example("vgg16-tiny", root)
    slice_model(onnx_path, root / "vgg16-tiny.sliced")
    return onnx_path, root / "vgg16-tiny.sliced"


@pytest.fixture(scope="module")
def profile(fleet, model):
    _, state = fleet
    return run_benchmark(model[1], tbd.testbed_cluster(state), OPTS)


def _sustained(profile, device: str, batch: int) -> float:
    return sum(m.latency_s.sustained for m in profile.blocks if m.device == device and m.batch == batch)


def test_benchmark_measures_the_fleets_limits(fleet, profile):
    _, state = fleet
    assert not profile.failures, profile.failures
    by_name = {d.name: d for d in profile.devices}
    assert list(by_name) == ["fast", "mid", "slow"]
    for record in state.devices:
        d = by_name[record.spec.name]
        assert (d.engine, d.address, d.cpu_quota) == ("testbed", record.address, record.spec.cpu)
        assert d.memory_total_bytes == record.spec.memory_bytes  # the device's cgroup limit
        assert 0 < d.memory_available_bytes < record.spec.memory_bytes
    fast, mid, slow = (_sustained(profile, n, BATCH) for n in ("fast", "mid", "slow"))
    print(f"sustained compute at batch {BATCH}: fast {fast:.4f} s, mid {mid:.4f} s, slow {slow:.4f} s")
    assert 1.8 < slow / fast < 8, (fast, slow)  # quotas 1.0 vs 0.3: ~3.3x
    assert 1.3 < mid / fast < 5, (fast, mid)  # 1.0 vs 0.5: ~2x
    assert len(profile.links) == 6
    for lk in profile.links:
        # the delay is on what a device receives: a round trip a↔b crosses delay(a) + delay(b)
        assert lk.rtt_median_s >= 0.95 * (DELAYS[lk.src] + DELAYS[lk.dst]), lk
        assert 0.5 * 50e6 / 8 < lk.bandwidth_Bps < 1.3 * 50e6 / 8, lk  # every pair has a 50 Mbit end
    assert profile.link("mid", "slow").one_way_latency_s >= 0.95 * DELAY_MS / 1e3


def test_cli_benchmark_on_the_testbed(on_fleet, model, tmp_path, capsys):
    out = tmp_path / "fleet.profile.json"
    argv = ["benchmark", str(model[1]), "--testbed", "-o", str(out), "--repeats", "3", "--warmup", "1"]
    assert main([*argv, "--pings", "3", "--transfer-repeats", "1", "--json"]) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert [(d["name"], d["address"], d["cpu_quota"]) for d in doc["devices"]] == [
        (r.spec.name, r.address, r.spec.cpu) for r in on_fleet.devices
    ]
    assert len(load_profile(out).links) == 6


def test_cluster_file_names_testbed_devices(on_fleet, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "devices:\n"
        "  - {name: slow, engine: testbed}\n"
        "  - {name: fast, engine: testbed, address: 10.213.0.10}\n"
    )
    cluster = load_cluster(path)
    assert [(d.name, d.address, d.cpu_quota) for d in cluster.devices] == [
        ("slow", on_fleet.device("slow").address, 0.3),
        ("fast", "10.213.0.10", 1.0),
    ]


def _plan(profile, sliced: Path, path: Path):
    """Latency plan from ``fast`` at BATCH, with a stage on each device (pins) so the chain crosses links."""
    manifest = Manifest.load(sliced)
    built = problem_from_profile(
        profile,
        manifest,
        source="fast",
        batch=BATCH,
        pins={0: "fast", 8: "mid", manifest.num_blocks - 1: "slow"},
    )
    best = optimize(built.problem, "latency")
    plan = best.to_plan(manifest.model_name, str(sliced), created_by="test")
    plan.predicted.update({"batch": BATCH, "source": "fast", "sink": "fast"})
    save_plan(plan, path)
    return best


def _cgroup_lines(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            out[c] = path
    return out


def test_deploy_on_the_fleet_predicts_and_goes_down(fleet, profile, model, tmp_path):
    _, state = fleet
    best = _plan(profile, model[1], tmp_path / "plan.json")
    assert [d for _, _, d in best.stages] == ["fast", "mid", "slow"]
    engine = LocalEngine()
    target = resolve_target(tmp_path / "plan.json", None)
    deployment = engine.deploy(target, DeploySettings("tb", threads=None), cluster=tbd.testbed_cluster(state))
    pids = {p.role: p.pid for p in deployment.processes}
    try:
        fast = state.device("fast")
        assert deployment.url == f"http://{fast.address}:8765"
        status = engine.status("tb")
        assert status.ready, status.detail
        assert {p.role: p.device for p in status.processes} == {
            "stage0": "fast",
            "stage1": "mid",
            "stage2": "slow",
            "gateway": "fast",
        }
        for role, device in (("stage0", "fast"), ("stage1", "mid"), ("stage2", "slow"), ("gateway", "fast")):
            record = state.device(device)
            groups = _cgroup_lines(pids[role])
            assert groups["cpu"].endswith(f"/{state.testbed_id}/{device}"), (role, groups)
            assert groups["memory"].endswith(f"/{state.testbed_id}/{device}"), (role, groups)
            netns = subprocess.run(
                ["ip", "netns", "identify", str(pids[role])], capture_output=True, text=True
            )
            assert netns.stdout.strip() == record.netns, role
            module = "layerline.engines.gateway_main" if role == "gateway" else "layerline.runtime.worker"
            cmdline = Path(f"/proc/{pids[role]}/cmdline").read_bytes().decode().split("\0")
            assert cmdline[1:3] == ["-m", module], cmdline  # the pid is the worker's own (nsenter exec'd it)
        x = np.random.default_rng(0).standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
        session = open_session(model[0], 1, False)
        want = session.run(None, {session.get_inputs()[0].name: x})[0]
        client = GatewayClient(deployment.url, timeout_s=30)
        got = client.predict_npy(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max())))
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            client.predict_npy(x)
            times.append(time.perf_counter() - t0)
        measured = statistics.median(times)
        print(f"predicted {best.latency_s * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms (median of 8)")
        # the shaped links and quotas are in the measurement (without the testbed: ~5 ms)
        assert 0.4 * best.latency_s < measured < 4 * best.latency_s + 0.05
    finally:
        engine.down("tb")
    for pid in pids.values():
        assert not processes.is_running(pid), pid
    daemons = {r.pid for r in state.processes()}
    for record in state.devices:
        assert set(netns_pids(record.netns)) <= daemons, record.spec.name
        assert set(cgroup_pids(record.cpu_cgroup)) <= daemons, record.spec.name


def test_status_after_the_testbed_went_down(fleet, profile, model, tmp_path):
    """Runs last: it takes the module's testbed down."""
    home, state = fleet
    _plan(profile, model[1], tmp_path / "plan.json")
    engine = LocalEngine()
    target = resolve_target(tmp_path / "plan.json", None)
    cluster = tbd.testbed_cluster(state)
    deployment = engine.deploy(target, DeploySettings("gone"), cluster=cluster)
    try:
        down(home)
        status = engine.status("gone")
        assert not status.ready
        assert f"testbed {state.testbed_id} was taken down" in status.detail
        assert not any(p.running for p in status.processes)
        with pytest.raises(EngineError, match="is gone"):
            engine.deploy(target, DeploySettings("again"), cluster=cluster)
    finally:
        engine.down("gone")
    assert not any(processes.is_running(p.pid) for p in deployment.processes)
