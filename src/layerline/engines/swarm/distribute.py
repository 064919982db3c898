"""Getting the worker and gateway images onto every node without a public registry.

Either a registry every node can pull from (:func:`push_image`: ``docker tag`` + ``docker push``), or, for
air-gapped fleets, ``docker save`` → file → ``docker load`` (:func:`save_image`, :func:`load_image`), or
straight from one daemon to others (:func:`copy_image`: ``docker save | docker load``, no temporary file).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from layerline.engines.swarm.docker import DockerCli
from layerline.errors import EngineError

__all__ = ["copy_image", "has_image", "load_image", "push_image", "save_image"]

log = logging.getLogger(__name__)


def has_image(docker: DockerCli, tag: str) -> bool:
    return bool(docker.run(["image", "ls", "-q", tag]).strip())


def _require(docker: DockerCli, tag: str) -> None:
    if not has_image(docker, tag):
        where = docker.host or "the default docker daemon"
        raise EngineError(f"image {tag!r} is not on {where}; build it first: layerline image build")


def save_image(docker: DockerCli, tags: list[str], path: Path) -> Path:
    """``docker save`` ``tags`` into one tar file (for ``load_image`` on an offline node)."""
    for tag in tags:
        _require(docker, tag)
    docker.run(["save", "-o", str(path), *tags], timeout_s=1800)
    return path


def load_image(docker: DockerCli, path: Path) -> str:
    """``docker load`` a tar written by :func:`save_image`; returns docker's report (the loaded tags)."""
    if not path.is_file():
        raise EngineError(f"no image file {path}; write one with `layerline image save -o {path}`")
    return docker.run(["load", "-q", "-i", str(path)], timeout_s=1800).strip()


def copy_image(source: DockerCli, target: DockerCli, tag: str, force: bool = False) -> float | None:
    """Stream ``tag`` from ``source`` into ``target`` (save | load); seconds taken, None when it was there."""
    _require(source, tag)
    if not force and has_image(target, tag):
        return None
    t0 = time.monotonic()
    saver = subprocess.Popen(source.argv(["save", tag]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        loaded = subprocess.run(
            target.argv(["load", "-q"]), stdin=saver.stdout, capture_output=True, timeout=1800, check=False
        )
    finally:
        assert saver.stdout is not None
        saver.stdout.close()
        saver_err = saver.stderr.read().decode(errors="replace") if saver.stderr else ""
        saver.wait(timeout=60)
    if saver.returncode != 0 or loaded.returncode != 0:
        raise EngineError(
            f"copying {tag} to {target.host or 'the default daemon'} failed: "
            f"{saver_err.strip() or loaded.stderr.decode(errors='replace').strip()}"
        )
    took = time.monotonic() - t0
    log.info("copied %s to %s in %.1f s", tag, target.host, took)
    return took


def push_image(docker: DockerCli, tag: str, registry: str) -> str:
    """Tag ``tag`` as ``REGISTRY/name:version`` and push it; returns the pushed reference."""
    _require(docker, tag)
    registry = registry.rstrip("/")
    if not registry or "://" in registry:
        raise EngineError(
            f"registry {registry!r}: give HOST[:PORT][/PATH] without a scheme, e.g. reg.lan:5000"
        )
    ref = f"{registry}/{tag.rsplit('/', 1)[-1]}"
    docker.run(["tag", tag, ref])
    docker.run(["push", ref], timeout_s=1800)
    return ref
