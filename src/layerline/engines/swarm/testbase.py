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

__all__ = ["BASE_TAG", "cache_dir", "ensure_base_image", "ensure_rootfs_tar"]

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
