"""`status` and `down` act through the engine that made the deployment (its state file says which)."""

from __future__ import annotations

import time

from layerline.cli.status_cmd import engine_for
from layerline.engines.local import LocalEngine
from layerline.engines.state import DeploymentState, save_state
from layerline.engines.swarm import SwarmEngine


def _state(name: str, engine: str, extra: dict) -> DeploymentState:
    return DeploymentState(
        name=name,
        engine=engine,
        url="http://127.0.0.1:1",
        host="127.0.0.1",
        port=1,
        sliced="/nonexistent",
        stages=(),
        processes=(),
        started_at=time.time(),
        extra=extra,
    )


def test_swarm_deployments_go_to_the_swarm_engine():
    save_state(_state("on-swarm", "swarm", {"docker_host": "unix:///tmp/x.sock", "image": "img:1"}))
    engine = engine_for("on-swarm")
    assert isinstance(engine, SwarmEngine)
    assert engine.image == "img:1"
    assert engine.docker.host == "unix:///tmp/x.sock"


def test_local_deployments_go_to_the_local_engine():
    save_state(_state("on-local", "local", {}))
    assert isinstance(engine_for("on-local"), LocalEngine)
