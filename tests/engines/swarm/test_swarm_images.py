"""The gateway image and moving images between daemons, on the tests' private dockerd (slow, swarm)."""

from __future__ import annotations

import pytest

from layerline.engines.swarm.distribute import has_image, load_image, save_image

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


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
