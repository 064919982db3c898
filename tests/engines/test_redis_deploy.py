"""``deploy --transport redis`` with the local engine: a private redis-server, workers and gateway."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerline.engines import processes
from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.stages import resolve_target
from layerline.engines.state import list_deployments
from layerline.examples import EXAMPLES, build_example
from layerline.graph import slice_model
from layerline.runtime.redis_server import redis_server_binary
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(
        redis_server_binary() is None, reason="redis-server is not installed (apt-get install redis-server)"
    ),
]
pytest.importorskip("redis", reason="the redis package is not installed (pip install redis)")


@pytest.fixture(scope="module")
def tiny_vgg(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("vgg")
    model = build_example("vgg16-tiny", work / "vgg16-tiny.onnx")
    slice_model(model, work / "vgg.sliced", name="vgg16-tiny")
    return model, work / "vgg.sliced"


def test_three_stage_redis_deployment_matches_monolithic(tiny_vgg):
    model, sliced = tiny_vgg
    engine = LocalEngine()
    settings = DeploySettings(name="r1", port=processes.free_port(), transport="redis", redis_url="auto")
    state = engine.deploy(resolve_target(sliced, 3), settings)
    try:
        status = engine.status("r1")
        assert status.ready, status.detail
        assert [p.role for p in status.processes] == [
            "redis",
            "stage0.r0",
            "stage1.r0",
            "stage2.r0",
            "gateway",
        ]
        assert state.extra["transport"] == "redis" and state.extra["redis_url"].startswith(
            "redis://127.0.0.1:"
        )
        session = open_session(model)
        names = [o.name for o in session.get_outputs()]
        client = GatewayClient(state.url)
        for seed in range(3):
            inputs = EXAMPLES["vgg16-tiny"].sample_inputs(2, np.random.default_rng(seed))
            got = client.infer(inputs)
            for name, expected in zip(names, session.run(None, inputs), strict=True):
                np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)
    finally:
        engine.down("r1")
    assert not any(processes.is_running(p.pid) for p in state.processes)  # redis-server included
    assert list_deployments() == []
