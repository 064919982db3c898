"""The worker image's recipe (no docker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerline.engines.swarm.image import DOCKERFILE, layerline_wheel
from layerline.errors import EngineError

ROOT = Path(__file__).resolve().parents[3]


def test_dockerfile_in_the_repo_is_the_one_the_builder_writes():
    assert (ROOT / "docker" / "Dockerfile.worker").read_text() == DOCKERFILE


def test_dockerfile_installs_offline_only_what_the_worker_needs():
    run = DOCKERFILE.split("RUN", 1)[1].split("ENV", 1)[0]
    assert run.count("--no-index") == 2
    assert "onnxruntime numpy" in run and "--no-deps" in run
    assert 'ENTRYPOINT ["python3", "-m", "layerline.runtime.worker"]' in DOCKERFILE
    assert 'CMD ["--config", "/config/worker.json"]' in DOCKERFILE


@pytest.mark.slow
def test_layerline_wheel_builds_without_touching_the_tree(tmp_path):
    before = sorted(p.name for p in ROOT.iterdir())
    wheel = layerline_wheel(tmp_path)
    assert wheel.name.startswith("layerline-") and wheel.suffix == ".whl"
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "layerline/runtime/worker.py" in names
    assert sorted(p.name for p in ROOT.iterdir()) == before


def test_unknown_architecture_is_refused(tmp_path):
    from layerline.engines.swarm.image import download_wheels

    with pytest.raises(EngineError, match="architecture 'sparc'"):
        download_wheels(tmp_path, arch="sparc")


def test_gateway_dockerfile_in_the_repo_is_the_one_the_builder_writes():
    from layerline.engines.swarm.image import GATEWAY_DOCKERFILE

    assert (ROOT / "docker" / "Dockerfile.gateway").read_text() == GATEWAY_DOCKERFILE
    assert "--no-index" in GATEWAY_DOCKERFILE and "aiohttp prometheus_client" in GATEWAY_DOCKERFILE


def test_registry_with_a_scheme_is_refused_before_docker_is_asked():
    from layerline.engines.swarm.distribute import push_image

    class NoDocker:  # the check happens before any docker call; a call would fail loudly
        host = None

        def run(self, args, **kw):
            return "abc" if args[:2] == ["image", "ls"] else pytest.fail(f"docker called: {args}")

    with pytest.raises(EngineError, match="without a scheme"):
        push_image(NoDocker(), "layerline-worker:latest", "https://reg.lan:5000")
