"""``layerline predict --async / --status / --wait / --cancel`` against a real local deployment."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from layerline.cli.main import main
from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.stages import resolve_target
from layerline.examples import EXAMPLES, build_example
from layerline.graph import slice_model
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """vgg16-tiny in 2 stages, deployed by the local engine (real processes); its URL and model file."""
    work = tmp_path_factory.mktemp("predict_async")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAYERLINE_HOME", str(work / "home"))
        model = build_example("vgg16-tiny", work / "vgg16-tiny.onnx")
        slice_model(model, work / "vgg.sliced", name="vgg16-tiny")
        engine = LocalEngine()
        state = engine.deploy(
            resolve_target(work / "vgg.sliced", 2), DeploySettings(name="pa", port=processes.free_port())
        )
        try:
            yield state.url, model
        finally:
            engine.down("pa")


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _reference(model: Path, x: np.ndarray) -> np.ndarray:
    session = open_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_async_status_wait_cancel(deployment, tmp_path, capsys) -> None:
    url, model = deployment
    x = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(0))["input"]
    np.save(tmp_path / "x.npy", x)

    code, out, err = _cli(capsys, str(tmp_path / "x.npy"), "--async", "--url", url)
    assert code == 0, err
    job_id = out.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id) and f"--wait {job_id}" in err

    code, out, err = _cli(capsys, "--wait", job_id, "--url", url, "-o", str(tmp_path / "y.npy"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["id"] == job_id and doc["outputs"] == {"logits": {"dtype": "float32", "shape": [2, 1000]}}
    assert len(doc["top_k"]) == 2 and len(doc["top_k"][0]) == 5
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _reference(model, x), rtol=1e-5, atol=1e-6)

    code, out, err = _cli(capsys, "--wait", job_id, "--url", url, "--top-k", "3")
    assert code == 0, err
    assert f"request {job_id}" in out and "top-3 (sample 1)" in out

    code, out, err = _cli(capsys, "--status", job_id, "--url", url, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["status"] == "succeeded" and status["result_url"] == f"/v1/requests/{job_id}/result"
    code, out, _ = _cli(capsys, "--status", job_id, "--url", url)
    assert code == 0 and out.startswith(f"{job_id}  succeeded")

    code, out, err = _cli(capsys, "--cancel", job_id, "--url", url)
    assert code == 1 and "already succeeded" in err

    code, out, err = _cli(capsys, str(tmp_path / "x.npy"), "--async", "--json", "--url", url)
    assert code == 0, err
    queued = json.loads(out)
    assert queued["status"] == "queued" and queued["status_url"] == f"/v1/requests/{queued['id']}"
    GatewayClient(url).wait(queued["id"], timeout_s=30)

    code, _, err = _cli(capsys, "--status", "f" * 32, "--url", url)
    assert code == 1 and "no async request" in err


def test_cancel_and_wait_on_a_cancelled_request(deployment, capsys) -> None:
    url, _ = deployment
    client = GatewayClient(url)
    x = EXAMPLES["vgg16-tiny"].sample_inputs(256, np.random.default_rng(1))["input"]
    # ~70 ms of compute each, 8 at a time on 2 cores: the last of 24 waits well over a second in the queue
    ids = [client.submit({"input": x}) for _ in range(24)]
    code, out, err = _cli(capsys, "--cancel", ids[-1], "--url", url, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "cancelled"
    code, _, err = _cli(capsys, "--wait", ids[-1], "--url", url)
    assert code == 1 and "was cancelled" in err
    for job_id in ids[:-1]:
        assert client.wait(job_id, timeout_s=60)["logits"].shape == (256, 1000)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["x.npy", "--wait", "abc"],
        ["--status", "abc", "--cancel", "abc"],
        ["--async", "--status", "abc"],
        ["--status", "abc", "-o", "y.npy"],
        ["x.npy", "--async", "-o", "y.npy"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["predict", *args])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err
