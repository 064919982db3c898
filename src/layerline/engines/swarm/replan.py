"""Healing a swarm deployment after a node is lost: plan again on the nodes still ready, deploy again.

``heal(engine, name, profile)`` finds the devices whose nodes are not Ready/Active (a node taken off the
network, drained or removed), runs ``configure`` on the existing profile with those devices excluded and
the deployment's own source device (and the given sink, batch and objective), then replaces the
deployment with the new plan under the same name and port. The whole chain is redeployed (stages are cheap
to start; a partial move would leave the surviving stages' next-hop addresses stale). The source device
cannot be lost: requests enter there, so the error says to pick another source with
``layerline configure``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.engines.local import DeploySettings
from layerline.engines.stages import resolve_target
from layerline.engines.state import DeploymentState, load_state
from layerline.engines.swarm.engine import SwarmEngine
from layerline.engines.swarm.nodes import list_nodes, node_for_device
from layerline.errors import EngineError, LayerlineError

__all__ = ["HealResult", "heal", "lost_devices"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealResult:
    """What ``heal`` did: the devices left out, the new plan file, the new deployment and its report."""

    lost: tuple[str, ...]
    plan_path: Path
    state: DeploymentState
    report: dict[str, Any]
    seconds: float


def lost_devices(engine: SwarmEngine, devices: list[str]) -> dict[str, str]:
    """Device → why it cannot run a stage now (no node, or its node not Ready/Active)."""
    nodes = list_nodes(engine.docker)
    lost = {}
    for device in devices:
        try:
            node_for_device(nodes, device)
        except EngineError as exc:
            lost[device] = str(exc)
    return lost


def heal(
    engine: SwarmEngine,
    name: str,
    profile: Path,
    *,
    plan_out: Path | None = None,
    sink: str | None = None,
    batch: int = 1,
    objective: str = "latency",
    memory_fraction: float = 0.8,
    ready_timeout_s: float = 120.0,
    progress: Callable[[str], None] = lambda _msg: None,
) -> HealResult:
    """Re-plan deployment ``name`` onto the devices whose nodes are usable and deploy the new plan."""
    from layerline.cli.configure_cmd import build_report
    from layerline.plan import save_plan
    from layerline.profile.format import load_profile

    t0 = time.monotonic()
    state = load_state(name)
    if state.engine != engine.name:
        raise EngineError(
            f"deployment {name!r} runs on the {state.engine} engine; heal works on swarm deployments"
        )
    prof = load_profile(profile)
    lost = lost_devices(engine, [d.name for d in prof.devices])
    if not lost:
        raise EngineError(
            f"every device of {profile} has a ready node; nothing to heal (`layerline status --name {name}` "
            "shows what is wrong)"
        )
    source = str(state.extra.get("source_device") or state.stages[0]["device"])
    if source in lost:
        raise EngineError(
            f"the source device {source!r} is lost ({lost[source]}); requests enter there, so plan again "
            f"with another source: layerline configure {profile} --source DEVICE, then deploy that plan"
        )
    progress(f"planning without {', '.join(sorted(lost))}")
    try:
        report = build_report(
            profile,
            source=source,
            sink=sink,
            batch=batch,
            objective=objective,
            memory_fraction=memory_fraction,
            exclude=sorted(lost),
        )
    except LayerlineError as exc:
        raise EngineError(f"no plan fits the surviving devices: {exc}") from exc
    plan_path = plan_out or profile.with_name(f"{name}.healed.plan.json")
    save_plan(report["plan"], plan_path)
    progress(f"replacing deployment {name} with {plan_path}")
    engine.down(name)
    settings = DeploySettings(
        name=name,
        port=state.port,
        exact=bool(state.extra.get("exact", False)),
        ready_timeout_s=ready_timeout_s,
    )
    new_state = engine.deploy(resolve_target(plan_path, None), settings, progress)
    return HealResult(tuple(sorted(lost)), plan_path, new_state, report, time.monotonic() - t0)
