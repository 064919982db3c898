"""The Docker Swarm engine: stage workers as swarm services, built from one worker image (docs/swarm.md)."""

from __future__ import annotations

from layerline.engines.swarm.docker import DockerCli
from layerline.engines.swarm.engine import LABEL, ServiceStatus, SwarmEngine, SwarmStatus
from layerline.engines.swarm.image import (
    DEFAULT_BASE_IMAGE,
    DEFAULT_WORKER_IMAGE,
    DOCKERFILE,
    BuiltImage,
    build_worker_image,
    download_wheels,
)

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "DEFAULT_WORKER_IMAGE",
    "DOCKERFILE",
    "LABEL",
    "BuiltImage",
    "DockerCli",
    "ServiceStatus",
    "SwarmEngine",
    "SwarmStatus",
    "build_worker_image",
    "download_wheels",
]
