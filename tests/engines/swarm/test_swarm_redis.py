"""The swarm engine with the Redis transport: replicas as service tasks, `layerline scale` through
`docker service scale`, on the tests' private single-node swarm and a real redis-server on loopback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from layerline.engines import processes
from layerline.engines.local import DeploySettings
from layerline.engines.stages import resolve_target
from layerline.engines.swarm import SwarmEngine
from layerline.errors import EngineError
from layerline.examples import EXAMPLES, build_example
from layerline.graph import slice_model
from layerline.runtime.redis_server import start_redis_server
from layerline.runtime.session import open_session
from layerline.serve.client import GatewayClient

pytestmark = [pytest.mark.swarm, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = start_redis_server(processes.free_port(), tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


def test_redis_stages_with_replicas_scale_and_predict(
    swarm_docker, worker_image, gateway_image, redis_url, tmp_path
):
    model = build_example("vgg16-tiny", tmp_path / "vgg16-tiny.onnx")
    slice_model(model, tmp_path / "vgg.sliced", name="vgg16-tiny")
    engine = SwarmEngine(docker_host=swarm_docker.host, image=worker_image, gateway_image=gateway_image)
    settings = DeploySettings(
        name="swr", port=processes.free_port(), transport="redis", redis_url=redis_url, replicas=(1, 2, 1)
    )
    state = engine.deploy(resolve_target(tmp_path / "vgg.sliced", 3), settings)
    try:
        status = engine.status("swr")
        assert status.ready, status.detail
        assert [(s.role, s.running, s.desired) for s in status.services][:3] == [
            ("stage0", 1, 1), ("stage1", 2, 2), ("stage2", 1, 1)
        ]  # fmt: skip
        session = open_session(model)
        client = GatewayClient(state.url, timeout_s=60)
        for seed in range(6):  # several requests: both replicas of stage 1 take some
            inputs = EXAMPLES["vgg16-tiny"].sample_inputs(1, np.random.default_rng(seed))
            got = client.infer(inputs)
            for out, want in zip(session.get_outputs(), session.run(None, inputs), strict=True):
                atol = 1e-6 * max(1.0, float(np.abs(want).max()))
                np.testing.assert_allclose(got[out.name], want, rtol=1e-5, atol=atol)
        # `layerline scale` from another process: docker service scale behind the swarm engine's scaler
        out = subprocess.run(
            [sys.executable, "-m", "layerline.cli.main", "scale", "1=3", "--name", "swr"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr + out.stdout
        scaler = engine.scaler("swr")
        assert scaler.replicas(1) == 3
        scaler.scale(1, 1, timeout_s=60)
        assert scaler.replicas(1) == 1
        with pytest.raises(ValueError, match=r"stages 0\.\.2"):
            scaler.scale(5, 1)
        inputs = EXAMPLES["vgg16-tiny"].sample_inputs(1, np.random.default_rng(99))
        np.testing.assert_allclose(
            client.infer(inputs)[session.get_outputs()[0].name],
            session.run(None, inputs)[0],
            rtol=1e-5,
            atol=1e-5,
        )
    finally:
        engine.down("swr")


def test_redis_without_a_reachable_url_is_refused(swarm_docker, worker_image, gateway_image, tmp_path):
    model = build_example("vgg16-tiny", tmp_path / "m.onnx")
    slice_model(model, tmp_path / "m.sliced", name="m")
    engine = SwarmEngine(docker_host=swarm_docker.host, image=worker_image, gateway_image=gateway_image)
    settings = DeploySettings(name="swr2", port=processes.free_port(), transport="redis", redis_url="auto")
    with pytest.raises(EngineError, match="does not start Redis"):
        engine.deploy(resolve_target(tmp_path / "m.sliced", 2), settings)
    tcp = DeploySettings(name="swr3", port=processes.free_port(), replicas=(1, 2))
    with pytest.raises(EngineError, match="--transport redis for more than one replica"):
        engine.deploy(resolve_target(tmp_path / "m.sliced", 2), tcp)
