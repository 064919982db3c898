"""Autoscaling a real deployment: redis-server, worker processes, the gateway and the autoscaler process."""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from autoscale_support import NEEDS_REDIS, ReplicaTimeline, build_slow_middle, sample_input

from layerline.autoscale.local_scaler import LocalReplicaScaler
from layerline.autoscale.policy import AutoscaleConfig, StagePolicy
from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.state import deployment_dir, load_state
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient

pytestmark = [*NEEDS_REDIS, pytest.mark.slow]


@pytest.fixture(scope="module")
def slow_middle(tmp_path_factory):
    return build_slow_middle(tmp_path_factory.mktemp("slowmid"))


def _expected(model: Path, seeds: range) -> dict[int, np.ndarray]:
    session = open_session(model)
    return {s: session.run(None, sample_input(s))[0] for s in seeds}


def _decisions(log_text: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(r"stage (\d+): (\d+) → (\d+) replicas", log_text)]


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} is not in the metrics")


def test_a_burst_scales_only_the_slow_stage_and_it_comes_back_down(slow_middle):
    model, target = slow_middle
    seeds = range(8)
    expected = _expected(model, seeds)
    policy = StagePolicy(min_replicas=1, max_replicas=3, target=4, up_delay_s=1.0, down_delay_s=3.0)
    settings = DeploySettings(
        name="burst",
        port=processes.free_port(),
        transport="redis",
        autoscale=AutoscaleConfig.uniform(3, policy, interval_s=0.2),
    )
    engine = LocalEngine()
    t_start = time.monotonic()
    state = engine.deploy(target, settings)
    t_deployed = time.monotonic()
    try:
        assert [p.role for p in state.processes] == [
            "redis", "stage0.r0", "stage1.r0", "stage2.r0", "gateway", "autoscaler",
        ]  # fmt: skip
        metrics_url = state.extra["autoscale"]["metrics_url"]
        assert metrics_url.startswith("http://127.0.0.1:")
        client = GatewayClient(state.url)
        with ReplicaTimeline("burst") as timeline:
            time.sleep(0.5)

            def one(i: int) -> None:
                got = client.infer(sample_input(i % len(seeds)))["y"]
                np.testing.assert_allclose(got, expected[i % len(seeds)], rtol=1e-5, atol=1e-5)

            t0 = time.monotonic()
            with ThreadPoolExecutor(32) as pool:
                list(pool.map(one, range(400)))  # raises if any answer is wrong
            burst_s = time.monotonic() - t0
            peak = max(c[1] for _t, c in timeline.samples)
            deadline = time.monotonic() + 20.0
            while timeline.latest() != (1, 1, 1) and time.monotonic() < deadline:
                time.sleep(0.1)
            settled_s = time.monotonic() - t0
            time.sleep(0.3)
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:
            exported = resp.read().decode()
        log_text = Path(deployment_dir("burst") / "logs" / "autoscaler.log").read_text()
        print(
            f"\ndeploy {t_deployed - t_start:.1f} s; burst of 400 requests (32 at a time) {burst_s:.1f} s; "
            f"back to (1, 1, 1) {settled_s:.1f} s after the burst began"
        )
        print("replicas (s since sampling began → stage0, stage1, stage2):", timeline.changes())
        print("decisions:", [line.split("autoscale.controller: ")[-1] for line in log_text.splitlines()
                             if "replicas (" in line])  # fmt: skip

        # only the slow stage grew, and it came back to its minimum
        assert peak >= 2, timeline.changes()
        assert all(c[0] == 1 and c[2] == 1 for _t, c in timeline.samples), timeline.changes()
        assert timeline.latest() == (1, 1, 1), timeline.changes()
        decisions = _decisions(log_text)
        assert {d[0] for d in decisions} == {1}, decisions
        assert any(b > a for _s, a, b in decisions) and any(b < a for _s, a, b in decisions)
        assert all(1 <= b <= 3 for _s, _a, b in decisions)
        # the autoscaler's Prometheus metrics say the same
        assert _metric(exported, "layerline_autoscale_decisions_total", stage="1", direction="up") >= 1
        assert _metric(exported, "layerline_autoscale_decisions_total", stage="1", direction="down") >= 1
        for stage in ("0", "2"):
            for direction in ("up", "down"):
                assert (
                    _metric(exported, "layerline_autoscale_decisions_total", stage=stage, direction=direction)
                    == 0
                )
        assert _metric(exported, "layerline_autoscale_replicas_running", stage="1") == 1
        assert _metric(exported, "layerline_autoscale_replicas_desired", stage="1") == 1
        assert _metric(exported, "layerline_autoscale_stream_length", stage="1") == 0
        for name in ("lag", "pending", "oldest_pending_age_seconds", "live_consumers"):
            _metric(exported, f"layerline_autoscale_{name}", stage="1")
        # the stopped replicas drained (a graceful stop) rather than being killed
        stopped = sorted((deployment_dir("burst") / "logs").glob("stage1.r[1-9]*.log"))
        assert stopped, "no replica of stage 1 was started"
        for path in stopped:
            assert "stage 1 stopped (served" in path.read_text(), path.read_text()[-2000:]
        assert load_state("burst").desired_replicas(1) == 1
    finally:
        engine.down("burst")
    assert not deployment_dir("burst").exists()
    assert not processes.find_processes(str(deployment_dir("burst")))


def test_an_idle_stage_scales_to_zero_and_wakes_for_a_request(slow_middle):
    """min 0: the idle stage goes to zero; a request through the HTTP gateway waits in its stream and wakes a
    replica (the gateway counts a min-0 stage without replicas as ready: requests wait, they are not lost)."""
    model, target = slow_middle
    pinned = StagePolicy(min_replicas=1, max_replicas=1)
    elastic = StagePolicy(min_replicas=0, max_replicas=2, target=4, up_delay_s=1.0, down_delay_s=1.0)
    settings = DeploySettings(
        name="zero",
        port=processes.free_port(),
        transport="redis",
        autoscale=AutoscaleConfig((pinned, elastic, pinned), interval_s=0.1),
    )
    engine = LocalEngine()
    state = engine.deploy(target, settings)
    try:
        scaler = LocalReplicaScaler("zero")
        deadline = time.monotonic() + 15.0
        while scaler.replicas(1) != 0:
            assert time.monotonic() < deadline, "stage 1 did not scale to zero"
            time.sleep(0.1)
        status = engine.status("zero")
        assert "stage 1 is scaled to zero by the autoscaler" in status.detail, status.detail
        assert [(r.running, r.desired) for r in status.replicas] == [(1, 1), (0, 0), (1, 1)]

        assert status.ready, status.detail  # the gateway lets requests wait for a stage at zero
        t0 = time.monotonic()
        got = GatewayClient(state.url, timeout_s=30).infer(sample_input(5))["y"]
        woke_s = time.monotonic() - t0
        np.testing.assert_allclose(got, _expected(model, range(5, 6))[5], rtol=1e-5, atol=1e-5)
        print(f"\na request through the gateway to a stage scaled to zero was answered in {woke_s:.2f} s")
        assert scaler.replicas(1) == 1
        np.testing.assert_allclose(
            GatewayClient(state.url).infer(sample_input(6))["y"],
            _expected(model, range(6, 7))[6],
            rtol=1e-5,
            atol=1e-5,
        )
        log_text = (deployment_dir("zero") / "logs" / "autoscaler.log").read_text()
        decisions = _decisions(log_text)
        assert decisions[:2] == [(1, 1, 0), (1, 0, 1)], decisions
        assert "activation: 1 entries wait" in log_text
    finally:
        engine.down("zero")
