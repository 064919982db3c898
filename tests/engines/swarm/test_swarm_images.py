"""The gateway image and moving images between daemons, on the tests' private dockerd (slow, swarm)."""

from __future__ import annotations

import pytest

from layerline.engines.swarm.distribute import has_image, load_image, save_image
from layerline.engines.swarm.image import build_gateway_image, download_wheels
from layerline.engines.swarm.testbase import cache_dir

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


@pytest.fixture(scope="session")
def gateway_image(swarm_docker, worker_image, swarm_timings) -> str:
    wheels = cache_dir() / "gateway-wheels-py311"
    if not all(list(wheels.glob(p)) for p in ("pip-*.whl", "aiohttp-*.whl", "prometheus_client-*.whl")):
        import importlib.metadata

        pins = tuple(f"{n}=={importlib.metadata.version(n)}" for n in ("aiohttp", "prometheus_client", "pip"))
        download_wheels(wheels, packages=pins)
    built = build_gateway_image(worker_image, "layerline-gateway:test", swarm_docker, wheels)
    swarm_timings["gateway image build"] = built.build_s
    swarm_timings["gateway image extra MB"] = (
        built.size_bytes - int(swarm_docker.run(["image", "inspect", "--format", "{{.Size}}", worker_image]))
    ) / 1e6
    return built.tag


def test_gateway_image_runs_the_gateway(swarm_docker, gateway_image):
    out = swarm_docker.run(["run", "--rm", "--network", "none", gateway_image, "--help"], timeout_s=120)
    assert "--config" in out


def test_save_then_load_restores_the_image(swarm_docker, gateway_image, tmp_path):
    tar = save_image(swarm_docker, [gateway_image], tmp_path / "images.tar")
    assert tar.stat().st_size > 10_000_000
    swarm_docker.run(["image", "rm", gateway_image])
    assert not has_image(swarm_docker, gateway_image)
    assert gateway_image in load_image(swarm_docker, tar)
    assert has_image(swarm_docker, gateway_image)
