"""The benchmark against real agent processes on loopback: a known block, a known link, incremental runs,
failed devices, cpu quotas, and the CLI."""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from profile_support import DelayRelay, sliced_chain

from layerline.cli.main import main
from layerline.errors import EngineError, TransportError
from layerline.graph import Manifest
from layerline.profile import BenchmarkOptions, DeviceSpec, load_profile, parse_cluster, run_benchmark
from layerline.profile.agents import AgentClient, start_local_agent, stop_agent
from layerline.profile.blocks import make_inputs
from layerline.profile.cgroup import cgroup_cpu_root, check_cpu_quota
from layerline.profile.controller import measure_link
from layerline.runtime.session import open_session
from layerline.tensors import TensorSpec

TWO = "devices:\n  - name: a\n  - name: b\n"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return sliced_chain(tmp_path_factory.mktemp("small") / "m.sliced", layers=3, width=32)


def _quick(**kw) -> BenchmarkOptions:
    return BenchmarkOptions(**{"repeats": 3, "warmup": 1, "pings": 3, "transfer_repeats": 1, **kw})


def test_known_block_latency_and_memory(tmp_path):
    """Each block's median equals a direct in-process timing of the same file (within 30%)."""
    sliced = sliced_chain(tmp_path / "heavy.sliced", layers=8, width=256, max_blocks=2)
    manifest = Manifest.load(sliced)
    assert manifest.num_blocks == 2
    x = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)

    def reference() -> list[float]:
        medians = []
        for block in manifest.blocks:
            sess = open_session(sliced / block.file, threads=1)
            name = sess.get_inputs()[0].name
            for _ in range(10):
                sess.run(None, {name: x})
            samples = []
            for _ in range(20):
                t0 = time.perf_counter()
                sess.run(None, {name: x})
                samples.append(time.perf_counter() - t0)
            medians.append(statistics.median(samples))
        return medians

    # timed before and after the benchmark: a load spike from the previous test (a container or worker
    # still stopping) must not make the reference itself slow
    before = reference()
    prof = run_benchmark(
        sliced,
        parse_cluster("devices: [{name: d}]"),
        BenchmarkOptions(batch_sizes=(1, 256), repeats=20, threads=1),
    )
    expected = [min(a, b) for a, b in zip(before, reference(), strict=True)]
    assert not prof.failures
    for block, want in zip(manifest.blocks, expected, strict=True):
        m = prof.block("d", block.index, 256)
        assert m.latency_s.repeats == 20 and m.latency_s.warmup == 3
        assert m.latency_s.min <= m.latency_s.median <= m.latency_s.p90
        assert m.latency_s.mean is not None and m.latency_s.min <= m.latency_s.mean
        assert m.latency_s.median == pytest.approx(want, rel=0.3), (block.index, m.latency_s, want)
        # the time of one run, never divided by the batch: batch 1 is not 256x faster
        assert prof.block_latency("d", block.index, 1) > m.latency_s.median / 256
        assert m.memory_bytes.weights == block.weight_bytes == 4 * 256 * 256 * 4
        assert m.memory_bytes.activations_peak == 2 * 256 * 256 * 4  # input + output tensors at batch 256
        assert m.memory_bytes.rss_delta >= 0
    dev = prof.device("d")
    assert dev.cores >= 1 and 0 < dev.memory_available_bytes <= dev.memory_total_bytes
    assert dev.memory_budget_bytes == dev.memory_available_bytes
    # a real stage hop on the device: tens of microseconds to a few milliseconds on a loaded 2-core host
    assert dev.hop_overhead_s is not None and 1e-6 < dev.hop_overhead_s < 0.01, dev.hop_overhead_s


def test_known_link_latency_and_bandwidth(tmp_path):
    """Through a relay adding 20 ms per direction and capped at 2 MB/s: RTT ≈ 40 ms, 2e6 B/s."""
    a = start_local_agent(DeviceSpec("a"), tmp_path)
    b = start_local_agent(DeviceSpec("b"), tmp_path)
    relay = DelayRelay((b.host, b.port), delay_s=0.020, rate_Bps=2e6)
    try:
        link = measure_link(a.client, "a", "b", "127.0.0.1", relay.port, sizes=[300_000], pings=6, repeats=2)
        direct = measure_link(a.client, "a", "b", b.host, b.port, sizes=[300_000], pings=6, repeats=2)
    finally:
        relay.close()
        stop_agent(a)
        stop_agent(b)
    assert 0.039 <= link.rtt_median_s <= 0.070, link
    assert link.one_way_latency_s == link.rtt_median_s / 2
    assert link.rtt_p90_s >= link.rtt_median_s
    assert link.bandwidth_Bps == pytest.approx(2e6, rel=0.3), link
    assert link.transfer_sizes_bytes == (300_000,)
    assert direct.rtt_median_s < 0.01 and direct.bandwidth_Bps > 2e7


def test_incremental_rerun_and_refresh(tmp_path, small):
    out = tmp_path / "p.json"
    first = run_benchmark(small, parse_cluster("devices: [{name: a}]"), _quick())
    from layerline.profile import save_profile

    save_profile(first, out)
    prev = load_profile(out)
    again = run_benchmark(small, parse_cluster("devices: [{name: a}]"), _quick(), prev)
    assert again.device("a").measured_at == first.device("a").measured_at
    assert again.blocks == first.blocks
    # a new device: the old one is kept, the new one and both links are measured
    grown = run_benchmark(small, parse_cluster(TWO), _quick(), prev)
    assert grown.device("a").measured_at == first.device("a").measured_at
    assert grown.device("b").measured_at > first.device("a").measured_at
    assert {(lk.src, lk.dst) for lk in grown.links} == {("a", "b"), ("b", "a")}
    assert grown.link("a", "b").transfer_sizes_bytes == (65536,)  # 32 floats per cut, raised to the minimum
    kept = run_benchmark(small, parse_cluster(TWO), _quick(), grown)
    assert kept.links == grown.links and kept.blocks == grown.blocks
    # a new batch size needs new measurements
    more = run_benchmark(small, parse_cluster("devices: [{name: a}]"), _quick(batch_sizes=(1, 2)), prev)
    assert more.device("a").measured_at > first.device("a").measured_at
    assert {m.batch for m in more.blocks} == {1, 2}
    refreshed = run_benchmark(small, parse_cluster("devices: [{name: a}]"), _quick(refresh=True), prev)
    assert refreshed.device("a").measured_at > first.device("a").measured_at
    assert refreshed.blocks[0] != first.blocks[0]


def test_failed_device_is_reported_by_name_and_the_rest_saved(tmp_path, small):
    cluster = parse_cluster("devices:\n  - name: good\n  - name: bad\n    cpu_quota: 0.5\n")
    prof = run_benchmark(small, cluster, _quick(cgroup_root=tmp_path / "no-cgroup"))
    assert [d.name for d in prof.devices] == ["good"]
    assert len(prof.blocks) == 3 and not prof.links
    (failure,) = prof.failures
    assert failure.device == "bad" and failure.what == "agent"
    assert "cpu_quota=0.5" in failure.error and "remove cpu_quota" in failure.error


def test_agent_that_does_not_answer_times_out():
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        client = AgentClient.connect("mute", "127.0.0.1", port, timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=r"agent of device 'mute'.*did not answer in time"):
            client.hello()
        assert time.monotonic() - t0 < 2
        client.ch.close()


def test_agent_checks_block_bytes(tmp_path):
    agent = start_local_agent(DeviceSpec("x"), tmp_path)
    try:
        agent.client.ch.send({"op": "load_block", "block": 0, "size": 3, "sha256": "0" * 64}, b"abc")
        reply, _ = agent.client.ch.recv()
        assert "sha256 mismatch" in reply["error"]
        with pytest.raises(TransportError, match="unknown operation 'nope'"):
            agent.client.ch.call({"op": "nope"})
        assert agent.client.hello()["name"] == "x"  # still serving
    finally:
        stop_agent(agent)
    assert agent.proc.poll() is not None


def _cgroup_usable() -> bool:
    root = cgroup_cpu_root()
    return (root / "cpu.cfs_quota_us").is_file() and os.geteuid() == 0 and os.access(root, os.W_OK)


@pytest.mark.skipif(not _cgroup_usable(), reason="needs root and a writable cgroup v1 cpu controller")
def test_cpu_quota_puts_the_agent_in_a_cgroup(tmp_path):
    name = f"test-{os.getpid()}"
    agent = start_local_agent(DeviceSpec(name, cpu_quota=0.5), tmp_path)
    group = agent.cgroup
    try:
        assert group == cgroup_cpu_root() / f"layerline-{name}"
        assert (group / "cpu.cfs_quota_us").read_text().strip() == "5000"
        assert str(agent.proc.pid) in (group / "cgroup.procs").read_text().split()
    finally:
        stop_agent(agent)
    assert not group.exists()


@pytest.mark.skipif(not _cgroup_usable(), reason="needs root and a writable cgroup v1 cpu controller")
def test_cpu_quota_slows_the_blocks(tmp_path):
    """A quarter of a core makes a ~2 ms block about 4x slower (median), not just its tail."""
    sliced = sliced_chain(tmp_path / "q.sliced", layers=8, width=512, max_blocks=1)
    name = f"q{os.getpid()}"
    cluster = parse_cluster(f"devices:\n  - name: free\n  - name: {name}\n    cpu_quota: 0.25\n")
    prof = run_benchmark(sliced, cluster, BenchmarkOptions(batch_sizes=(64,), threads=1, repeats=30, pings=2))
    assert not prof.failures
    # against the unlimited device's fastest run: other processes on this machine can slow its median
    ratio = prof.block_latency(name, 0, 64) / prof.block("free", 0, 64).latency_s.min
    assert 2.0 < ratio < 20.0, (ratio, prof.blocks)


def test_make_inputs():
    specs = [TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("x", "float32", ("n", 3))]
    got = make_inputs(specs, 4, {"seq": 7})
    assert got["ids"].shape == (4, 7) and got["ids"].dtype == np.int64
    assert set(np.unique(got["ids"])) <= {0, 1}
    assert got["x"].shape == (4, 3)
    with pytest.raises(ValueError, match="--dim seq=VALUE"):
        make_inputs(specs, 1)


def test_quota_refusals(tmp_path):
    with pytest.raises(EngineError, match=r"cpu_quota=0.05.*smallest quota.*0.1 of a core"):
        check_cpu_quota("tiny", 0.05)
    with pytest.raises(EngineError, match=r"device 'd' asks for cpu_quota=0.5 but there is no cgroup v1 cpu"):
        check_cpu_quota("d", 0.5, tmp_path)


def test_cli_benchmark_json_and_failure(tmp_path, small, capsys, monkeypatch):
    out = tmp_path / "p.json"
    rc = main(
        ["benchmark", str(small), "-o", str(out), "--json", "--repeats", "2", "--batch", "1", "--batch", "2"]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "layerline.profile" and doc["batch_sizes"] == [1, 2]
    assert load_profile(out).device("local") is not None
    cluster = tmp_path / "c.yaml"
    cluster.write_text("devices:\n  - name: ok\n  - name: limited\n    cpu_quota: 0.25\n")
    monkeypatch.setenv("LAYERLINE_CGROUP_CPU_ROOT", str(tmp_path / "none"))
    rc = main(
        ["benchmark", str(small), "--cluster", str(cluster), "-o", str(out), "--repeats", "2", "--pings", "2"]
    )
    captured = capsys.readouterr()
    assert rc == 1
    assert "limited (agent)" in captured.err and "ok" in captured.out
    saved = load_profile(out)
    assert [d.name for d in saved.devices] == ["ok"] and saved.failures[0].device == "limited"
    assert main(["benchmark", str(small), "-o", str(out), "--dim", "seq"]) == 1
