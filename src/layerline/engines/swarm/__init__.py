"""The Docker Swarm engine: stage workers as swarm services, built from one worker image (docs/swarm.md)."""

from __future__ import annotations

from layerline.engines.swarm.docker import DockerCli
from layerline.engines.swarm.engine import LABEL, ServiceStatus, SwarmEngine, SwarmStatus
from layerline.engines.swarm.image import (
    DEFAULT_BASE_IMAGE,
    DEFAULT_GATEWAY_IMAGE,
    DEFAULT_WORKER_IMAGE,
    DOCKERFILE,
    BuiltImage,
    build_gateway_image,
    build_worker_image,
    download_wheels,
)
from layerline.engines.swarm.nodes import SwarmNode, list_nodes

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "DEFAULT_GATEWAY_IMAGE",
    "DEFAULT_WORKER_IMAGE",
    "DOCKERFILE",
    "LABEL",
    "BuiltImage",
    "DockerCli",
    "ServiceStatus",
    "SwarmEngine",
    "SwarmNode",
    "SwarmStatus",
    "build_gateway_image",
    "build_worker_image",
    "download_wheels",
    "list_nodes",
]
