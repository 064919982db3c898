"""The ``layerline`` command as a user runs it: real subprocesses, exit codes, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from layerline.engines.processes import free_port
from layerline.examples import EXAMPLES


def layerline(*args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerline.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def test_help_and_usage_errors():
    out = layerline("--help")
    assert out.returncode == 0
    for command in ("quickstart", "examples", "slice", "deploy", "predict", "status", "down"):
        assert command in out.stdout
    assert layerline("deploy", "--help").stdout.count("examples:") == 1
    assert layerline().returncode == 2  # no command
    assert layerline("slice").returncode == 2  # missing argument
    assert layerline("deploy", "x", "--stages", "two").returncode == 2


def test_examples_list_and_build(tmp_path):
    out = layerline("examples")
    assert out.returncode == 0
    assert "vgg16" in out.stdout and "transformer" in out.stdout
    out = layerline("examples", "vgg16-tiny", "-o", str(tmp_path / "v.onnx"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "v.onnx").stat().st_size > 0
    out = layerline("examples", "no-such-model")
    assert out.returncode == 1
    assert "no-such-model" in out.stderr


def test_slice_errors_name_the_problem(tmp_path):
    out = layerline("slice", str(tmp_path / "missing.onnx"))
    assert out.returncode == 1
    assert "missing.onnx" in out.stderr
    (tmp_path / "model.txt").write_text("hello")
    out = layerline("slice", str(tmp_path / "model.txt"))
    assert out.returncode == 1
    assert ".onnx" in out.stderr


@pytest.mark.slow
def test_whole_workflow(tmp_path):
    """examples → slice → deploy → status → predict (.npy and curl-style /input) → down."""
    model = tmp_path / "vgg.onnx"
    assert layerline("examples", "vgg16-tiny", "-o", str(model)).returncode == 0
    out = layerline("slice", str(model), "-o", str(tmp_path / "vgg.sliced"), "--json")
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["format"] == "layerline.sliced" and len(manifest["blocks"]) >= 3

    port = free_port()
    out = layerline("deploy", str(tmp_path / "vgg.sliced"), "--stages", "3", "--port", str(port))
    assert out.returncode == 0, out.stderr + out.stdout
    try:
        assert "ready" in out.stdout
        status = layerline("status", "--json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        (dep,) = doc["deployments"]
        assert dep["ready"] and dep["name"] == "vgg"
        assert [p["role"] for p in dep["processes"]] == ["stage0", "stage1", "stage2", "gateway"]

        x = EXAMPLES["vgg16-tiny"].sample_inputs(1, np.random.default_rng(0))["input"]
        np.save(tmp_path / "x.npy", x)
        out = layerline("predict", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
        assert out.returncode == 0, out.stderr
        assert "top-5" in out.stdout
        y = np.load(tmp_path / "y.npy")
        assert y.shape == (1, 1000)

        from PIL import Image  # an image is resized and laid out to the model's input

        pixels = np.random.default_rng(1).integers(0, 255, size=(48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "picture.png")
        out = layerline("predict", str(tmp_path / "picture.png"), "--top-k", "3")
        assert out.returncode == 0, out.stderr
        assert "top-3" in out.stdout

        # a second deploy on the same port fails clearly, and the first one keeps serving
        again = layerline("deploy", str(tmp_path / "vgg.sliced"), "--port", str(port), "--name", "other")
        assert again.returncode == 1
        assert f"port {port}" in again.stderr
        assert layerline("predict", str(tmp_path / "x.npy")).returncode == 0
    finally:
        down = layerline("down")
    assert down.returncode == 0, down.stderr
    assert json.loads(layerline("status", "--json").stdout) == {"deployments": []}
    out = layerline("predict", str(tmp_path / "x.npy"), "--url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert "layerline status" in out.stderr or "connect" in out.stderr
