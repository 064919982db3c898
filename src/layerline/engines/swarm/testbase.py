"""Test tooling (not user-facing): a local base image with Debian bookworm's python3 (3.11), no registry.

``debootstrap --variant=minbase --include=python3 bookworm`` builds the root filesystem once (about 40 s);
its tar is cached under ``~/.cache/layerline-tests/`` and ``docker import``-ed into each test daemon.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from layerline.engines.swarm.docker import DockerCli
from layerline.errors import EngineError

__all__ = ["BASE_TAG", "cache_dir", "ensure_base_image", "ensure_rootfs_tar", "ensure_test_images"]

log = logging.getLogger(__name__)

BASE_TAG = "layerline-test-base:bookworm"
MIRROR = "http://deb.debian.org/debian"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "layerline-tests"


def ensure_rootfs_tar(cache: Path | None = None) -> Path:
    """The cached tar of a bookworm minbase root filesystem with python3 (built on first use; needs root)."""
    cache = cache or cache_dir()
    tar = cache / "bookworm-minbase-python3.tar"
    if tar.is_file():
        return tar
    if not shutil.which("debootstrap"):
        raise EngineError("debootstrap is not installed; apt-get install -y debootstrap")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="layerline-rootfs-", dir=cache) as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(rootfs), MIRROR],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if proc.returncode != 0:
            raise EngineError(
                f"debootstrap failed (exit {proc.returncode}): {proc.stdout[-1500:]}{proc.stderr}"
            )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / junk).glob("*.deb"):
                item.unlink()
        partial = tar.with_suffix(".tmp")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
        partial.replace(tar)
    return tar


def ensure_base_image(docker: DockerCli, tag: str = BASE_TAG, cache: Path | None = None) -> str:
    """``docker import`` the cached root filesystem as ``tag`` unless the daemon has it already."""
    if docker.run(["image", "ls", "-q", tag]).strip():
        return tag
    tar = ensure_rootfs_tar(cache)
    docker.run(["import", str(tar), tag], timeout_s=600)
    return tag


def ensure_test_images(
    docker: DockerCli, worker_tag: str = "layerline-worker:test", gateway_tag: str = "layerline-gateway:test"
) -> tuple[str, str]:
    """The worker and gateway images on ``docker``, built FROM the cached base with cached wheels.

    Builds only what the daemon lacks; wheels are downloaded once into the cache (pinned to the host's
    onnxruntime, numpy, aiohttp and prometheus_client).
    """
    import importlib.metadata

    from layerline.engines.swarm.image import build_gateway_image, build_worker_image, download_wheels

    def has(tag: str) -> bool:
        return bool(docker.run(["image", "ls", "-q", tag]).strip())

    cache = cache_dir()
    if not has(worker_tag):
        wheels = cache / "worker-wheels-py311"
        if not all(list(wheels.glob(p)) for p in ("pip-*.whl", "onnxruntime-*.whl", "numpy-*.whl")):
            download_wheels(wheels)
        build_worker_image(base_image=ensure_base_image(docker), tag=worker_tag, docker=docker, wheels=wheels)
    if not has(gateway_tag):
        wheels = cache / "gateway-wheels-py311"
        if not all(list(wheels.glob(p)) for p in ("pip-*.whl", "aiohttp-*.whl", "prometheus_client-*.whl")):
            pins = tuple(
                f"{n}=={importlib.metadata.version(n)}" for n in ("aiohttp", "prometheus_client", "pip")
            )
            download_wheels(wheels, packages=pins)
        build_gateway_image(worker_tag, gateway_tag, docker, wheels)
    return worker_tag, gateway_tag
