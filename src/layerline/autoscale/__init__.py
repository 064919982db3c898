"""Autoscaling of Redis-transport stages on the length of their streams (KEDA-style; docs/redis.md).

* :mod:`~layerline.autoscale.policy` — :class:`StagePolicy` (min/max replicas, target entries per
  replica, up/down stabilisation windows, activation), :class:`AutoscaleConfig`, and the pure
  :class:`ScalingPolicy` that turns backlogs into replica counts;
* :mod:`~layerline.autoscale.metrics` — :class:`RedisStageMetrics` (stream length, lag, pending, oldest
  pending age, live replicas per stage) and the Prometheus :class:`AutoscaleMetrics`;
* :mod:`~layerline.autoscale.controller` — :class:`AutoscaleController`, the loop;
* :mod:`~layerline.autoscale.local_scaler` — :class:`LocalReplicaScaler`, the replicas of a local
  deployment driven through its recorded processes (``layerline scale``);
* :mod:`~layerline.autoscale.service` — :func:`run_autoscaler` for a deployment (``layerline autoscale``,
  ``python -m layerline.autoscale``).

Names are imported on first use, so ``import layerline.autoscale.policy`` stays free of Redis,
prometheus_client and aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AutoscaleConfig",
    "AutoscaleController",
    "AutoscaleMetrics",
    "Decision",
    "LocalReplicaScaler",
    "RedisStageMetrics",
    "ScalingPolicy",
    "StageMetrics",
    "StagePolicy",
    "run_autoscaler",
]

_WHERE = {
    "AutoscaleConfig": "policy",
    "Decision": "policy",
    "ScalingPolicy": "policy",
    "StagePolicy": "policy",
    "AutoscaleMetrics": "metrics",
    "RedisStageMetrics": "metrics",
    "StageMetrics": "metrics",
    "AutoscaleController": "controller",
    "LocalReplicaScaler": "local_scaler",
    "run_autoscaler": "service",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
