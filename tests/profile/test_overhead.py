"""The measured per-stage hop overhead: the real worker path against a raw echo, and its profile field."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from layerline.errors import FormatError
from layerline.profile.cgroup import apply_cpu_quota, cgroup_cpu_root, remove_cgroup
from layerline.profile.format import DeviceProfile, Profile, load_profile, save_profile
from layerline.profile.overhead import HopOverhead, identity_model_bytes, measure_hop_overhead
from layerline.runtime.session import open_session


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_identity_model_is_valid_onnx_and_runs():
    data = identity_model_bytes()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Identity"]
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert (model.ir_version, model.opset_import[0].version) == (8, 17)
    session = open_session(data)
    x = np.arange(5, dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, x)


def test_measures_a_real_hop_through_the_stage_runtime():
    threads, fds = threading.active_count(), _open_fds()
    started = time.perf_counter()
    r = measure_hop_overhead(repeats=60, warmup=10)
    elapsed = time.perf_counter() - started
    print(f"hop overhead: median {r.median_s * 1e6:.0f} µs, mean {r.mean_s * 1e6:.0f} µs ({elapsed:.2f} s)")
    assert (r.repeats, r.warmup, r.payload_bytes) == (60, 10, 1024)
    # decoding, dispatching, the thread hand-off and encoding cost far more than a raw echo of the bytes
    assert r.worker_rtt_median_s > r.echo_rtt_median_s + r.run_median_s
    assert r.median_s == pytest.approx(r.worker_rtt_median_s - r.echo_rtt_median_s - r.run_median_s)
    assert r.mean_s == pytest.approx(max(0.0, r.worker_rtt_mean_s - r.echo_rtt_mean_s - r.run_mean_s))
    assert 10e-6 < r.median_s < 20e-3  # a hop is tens to hundreds of µs, not nothing and not a stall
    assert 0 < r.run_median_s < r.worker_rtt_median_s and r.echo_rtt_median_s > 0
    assert r.wall_s <= elapsed < 10.0
    # the worker's loop and compute threads, the echo thread and every socket are gone again
    deadline = time.monotonic() + 5.0
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads
    assert _open_fds() == fds
    back = HopOverhead.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r
    assert r.for_planning(None) == r.median_s and r.for_planning(0.35) == r.mean_s


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_hop_overhead(repeats=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        measure_hop_overhead(warmup=-1)


def test_the_module_imports_only_what_a_device_has():
    code = (
        "import sys, layerline.profile.overhead; "
        "heavy = ('onnx', 'yaml', 'rich', 'aiohttp', 'torch', 'layerline.graph', 'layerline.plan'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _device(**kw) -> DeviceProfile:
    return DeviceProfile("edge1", "127.0.0.1", "local", 2, 0.35, 8_000, 6_000, 5_000, 12.5, "1.32.0", **kw)


def _profile(device: DeviceProfile, sliced: str) -> Profile:
    return Profile(sliced, "m", "ab" * 32, (1,), (device,), (), ())


def test_profile_field_is_optional_and_checked(tmp_path):
    sliced = tmp_path / "m.sliced"
    sliced.mkdir()
    path = tmp_path / "p.json"
    save_profile(_profile(_device(hop_overhead_s=0.00042), str(sliced)), path)
    assert json.loads(path.read_text())["devices"][0]["hop_overhead_s"] == 0.00042
    assert load_profile(path).devices[0].hop_overhead_s == 0.00042
    # not measured: not written, so the file is what older versions wrote; older files load with None
    save_profile(_profile(_device(), str(sliced)), path)
    doc = json.loads(path.read_text())
    assert "hop_overhead_s" not in doc["devices"][0] and doc["format_version"] == 1
    assert load_profile(path).devices[0].hop_overhead_s is None
    for bad in (-0.001, math.nan, math.inf, "fast"):
        doc["devices"][0]["hop_overhead_s"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(FormatError, match=r"p\.json.*(hop_overhead_s|malformed).*layerline benchmark"):
            load_profile(path)


def _cgroup_usable() -> bool:
    root = cgroup_cpu_root()
    return (root / "cpu.cfs_quota_us").is_file() and os.geteuid() == 0 and os.access(root, os.W_OK)


@pytest.mark.skipif(not _cgroup_usable(), reason="needs root and a writable cgroup v1 cpu controller")
def test_under_a_cpu_quota_the_mean_includes_the_throttling(tmp_path):
    """Measured in the calling process: inside a quarter-core group its hops wait out throttled periods."""
    code = (
        "import json, sys\n"
        "from layerline.profile.overhead import measure_hop_overhead\n"
        "sys.stdin.readline()\n"
        "print(json.dumps(measure_hop_overhead().to_json()))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    group: Path | None = None
    try:
        group = apply_cpu_quota(f"hoptest-{os.getpid()}", 0.25, proc.pid)
        out, _ = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if group is not None:
            remove_cgroup(group)
    r = HopOverhead.from_json(json.loads(out))
    print(f"quota 0.25: hop overhead median {r.median_s * 1e6:.0f} µs, mean {r.mean_s * 1e6:.0f} µs")
    assert r.mean_s > 1.5 * r.median_s > 0, r
    assert group is not None and not group.exists()
