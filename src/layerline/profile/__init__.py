"""Profiling a sliced model on a cluster: cluster files, agents, the benchmark controller, the profile format.

``run_benchmark(sliced, cluster)`` starts one agent per device (``python -m layerline.profile.agent``),
times every block, measures every ordered pair of devices and returns a :class:`Profile`;
``save_profile`` / ``load_profile`` write and read it (``docs/profile.md``).

Names are loaded on first use: the agent process imports ``layerline.profile.agent`` and must not pull in
onnx, yaml or the slicer (it needs only the standard library, numpy and onnxruntime).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BenchmarkOptions",
    "BlockMeasurement",
    "Cluster",
    "DeviceProfile",
    "DeviceSpec",
    "Failure",
    "LatencyStats",
    "LinkMeasurement",
    "MemoryUse",
    "Profile",
    "default_cluster",
    "load_cluster",
    "load_profile",
    "measure_link",
    "parse_cluster",
    "run_benchmark",
    "save_profile",
]

_CLUSTER = ("Cluster", "DeviceSpec", "default_cluster", "load_cluster", "parse_cluster")
_CONTROLLER = ("BenchmarkOptions", "measure_link", "run_benchmark")


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'layerline.profile' has no attribute {name!r}")
    module = "cluster" if name in _CLUSTER else "controller" if name in _CONTROLLER else "format"
    return getattr(importlib.import_module(f"layerline.profile.{module}"), name)
