"""The stage worker process: its config, what it imports, how it starts, fails to start and stops."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from runtime_models import identity_spec

from layerline.errors import EngineError, FormatError
from layerline.runtime.launch import free_ports, start_local_chain
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.worker import WorkerConfig

WORKER = [sys.executable, "-m", "layerline.runtime.worker"]


def test_config_round_trips_and_checks_its_version(tmp_path):
    config = WorkerConfig(
        StageSpec(2, "m.onnx", ("a", "b"), 2, True), "0.0.0.0", 5002, "10.0.0.3", 5003, 4, 1 << 24, "s2", 0.1
    )
    assert WorkerConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    config.save(tmp_path / "w.json")
    assert WorkerConfig.load(tmp_path / "w.json") == config
    with pytest.raises(FormatError, match="format_version is 7"):
        WorkerConfig.from_json({**config.to_json(), "format_version": 7})
    with pytest.raises(FormatError, match="malformed"):
        WorkerConfig.from_json({"format_version": 1, "stage": {"index": 0, "model_path": "m"}})
    with pytest.raises(ValueError, match="queue_size"):
        WorkerConfig(StageSpec(0, "m.onnx"), queue_size=0)


def test_worker_imports_neither_onnx_nor_aiohttp_nor_prometheus():
    allowed = {
        "layerline",
        "layerline.errors",
        "layerline.runtime",
        "layerline.runtime.api",
        "layerline.runtime.connection",
        "layerline.runtime.framing",
        "layerline.runtime.inprocess",
        "layerline.runtime.session",
        "layerline.runtime.stage_worker",
        "layerline.runtime.stagespec",
        "layerline.runtime.tcp",
        "layerline.runtime.transport",
        "layerline.runtime.worker",
    }
    code = (
        "import sys, json; import layerline.runtime.worker; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('onnx', 'aiohttp', 'prometheus_client', 'layerline', 'yaml', 'rich', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    modules = set(json.loads(out.stdout))
    assert "layerline.runtime.worker" in modules  # the probe itself works
    assert modules <= allowed, f"the worker imports {sorted(modules - allowed)}"


def test_a_model_that_fails_to_load_exits_1_with_onnxruntime_message(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf")
    (port,) = free_ports(1)
    proc = subprocess.run(
        [*WORKER, "--model", str(bad), "--downstream", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot load model" in proc.stderr and str(bad) in proc.stderr
    assert "INVALID_PROTOBUF" in proc.stderr or "Protobuf parsing failed" in proc.stderr, proc.stderr


def test_launcher_reports_a_worker_that_cannot_start(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(EngineError, match=r"stage 0 worker exited with code 1.*cannot load model"):
        start_local_chain([StageSpec(0, str(bad))], workdir=tmp_path / "run", timeout_s=30)


def test_worker_from_cli_flags_logs_its_startup_line_and_stops_on_sigterm(tmp_path):
    spec = identity_spec(tmp_path)
    (downstream,) = free_ports(1)
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            *WORKER,
            "--model",
            spec.model_path,
            "--stage",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--downstream",
            f"127.0.0.1:{downstream}",
            "--ready-file",
            str(ready),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        info = json.loads(ready.read_text())
        listen = info["port"]
        assert listen > 0 and info["pid"] == proc.pid and info["stage"] == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"stage 1 listening on 127.0.0.1:{listen}; model {spec.model_path}" in err
    assert "inputs x[tensor(float) ['N']]" in err and "outputs y[" in err
    assert "stage 1 stopped" in err


def test_a_port_already_in_use_exits_1(tmp_path):
    spec = identity_spec(tmp_path)
    chain = start_local_chain([spec], workdir=tmp_path / "run")
    try:
        proc = subprocess.run(
            [
                *WORKER,
                "--model",
                spec.model_path,
                "--listen",
                f"127.0.0.1:{chain.ports[0]}",
                "--downstream",
                "127.0.0.1:9",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        chain.stop()
    assert proc.returncode == 1 and "Address already in use" in proc.stderr
