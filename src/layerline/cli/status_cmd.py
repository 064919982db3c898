"""``layerline status`` and ``layerline down``."""

from __future__ import annotations

import argparse

from rich.table import Table

from layerline.cli.output import console, print_json
from layerline.engines.state import parse_role
from layerline.errors import EngineError

__all__ = ["print_status", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="show running deployments, stage by stage",
        epilog="examples:\n  layerline status\n  layerline status --name vgg16 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", help="only this deployment")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_status)

    d = sub.add_parser(
        "down",
        help="stop a deployment and remove its state",
        epilog="examples:\n  layerline down\n  layerline down --name vgg16\n  layerline down --all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--name", help="the deployment to stop (needed when several run)")
    d.add_argument("--all", action="store_true", help="stop every deployment")
    d.set_defaults(func=run_down)


def _names(name: str | None) -> list[str]:
    from layerline.engines.state import list_deployments

    names = list_deployments()
    if name is None:
        return names
    if name not in names:
        raise EngineError(f"no deployment named {name!r}; running: {', '.join(names) or 'none'}")
    return [name]


def engine_for(name: str):
    """The engine that made deployment ``name`` (its state says which), so status/down act on all of it."""
    from layerline.engines.local import LocalEngine
    from layerline.engines.state import load_state

    state = load_state(name)
    if state.engine == "swarm":
        from layerline.engines.swarm import SwarmEngine

        options = {"image": state.extra["image"]} if state.extra.get("image") else {}
        return SwarmEngine(docker_host=state.extra.get("docker_host"), **options)
    return LocalEngine()


def print_swarm_status(status) -> None:
    state = status.state
    ready = "[green]ready[/]" if status.ready else f"[red]not ready[/] ({status.detail})"
    console.print(f"[bold]{state.name}[/]  engine=swarm  {state.url}  {ready}")
    table = Table()
    for col in ("role", "blocks", "node", "replicas", "state", "error"):
        table.add_column(col)
    blocks = {int(st["index"]): st.get("blocks") for st in state.stages}
    for s in status.services:
        span = blocks.get(s.stage) if s.stage >= 0 else None
        where = s.node if s.node_state in ("", "ready") else f"{s.node} [red]({s.node_state})[/]"
        replicas = f"{s.running}/{s.desired}"
        if s.running < s.desired or s.desired == 0:
            replicas = f"[red]{replicas}[/]"
        table.add_row(
            s.role or f"stage{s.stage}",
            f"{span[0]}-{span[1] - 1}" if span else "",
            where,
            replicas,
            s.state,
            s.error,
        )
    console.print(table)


def print_status(status) -> None:
    state = status.state
    ready = "[green]ready[/]" if status.ready else f"[red]not ready[/] ({status.detail})"
    testbed = state.extra.get("testbed") or {}
    where = f"  testbed={testbed.get('id')}" if testbed else ""
    auto = state.extra.get("autoscale")
    if auto:
        where += f"  autoscale={auto.get('metrics_url') or 'on'}"
    console.print(f"[bold]{state.name}[/]  engine={state.engine}{where}  {state.url}  {ready}")
    replicas = {r.stage: f"{r.running}/{r.desired}" for r in getattr(status, "replicas", ())}
    table = Table()
    for col in ("process", "blocks", "device", "replicas", "pid", "running", "health", "log"):
        table.add_column(col)
    addresses = {
        name: dev.get("address", "")
        for name, dev in dict((state.extra.get("testbed") or {}).get("devices") or {}).items()
    }
    for p in status.processes:
        if not p.blocks:
            blocks = ""
        elif p.blocks[1] - p.blocks[0] == 1:
            blocks = str(p.blocks[0])
        else:
            blocks = f"{p.blocks[0]}–{p.blocks[1] - 1}"
        running = "[green]yes[/]" if p.running else "[red]no[/]"
        health = "[green]ready[/]" if p.health in ("ready", "serving") else f"[red]{p.health}[/]"
        device = f"{p.device} ({addresses[p.device]})" if p.device in addresses else p.device
        stage = parse_role(p.role)
        count = replicas.get(stage[0], "") if stage else ""
        table.add_row(p.role, blocks, device, count, str(p.pid), running, health, p.log)
    for r in getattr(status, "replicas", ()):  # a stage scaled to zero has no process row
        if r.running == 0 and not any((parse_role(p.role) or (-1,))[0] == r.stage for p in status.processes):
            table.add_row(f"stage{r.stage}", "", "", f"0/{r.desired}", "", "", "no replica", "")
    console.print(table)


def run_status(args: argparse.Namespace) -> int:
    statuses = [engine_for(n).status(n) for n in _names(args.name)]
    if args.json:
        print_json({"deployments": [s.to_json() for s in statuses]})
    elif not statuses:
        console.print("no deployments; start one with `layerline deploy SLICED --stages K`")
    for s in statuses if not args.json else ():
        if s.state.engine == "swarm":
            print_swarm_status(s)
        else:
            print_status(s)
    return 0 if all(s.ready for s in statuses) else 1


def run_down(args: argparse.Namespace) -> int:
    names = _names(args.name)
    if not names:
        console.print("no deployments to stop")
        return 0
    if len(names) > 1 and not args.all:
        raise EngineError(f"several deployments run ({', '.join(names)}); pass --name NAME or --all")
    for name in names:
        engine_for(name).down(name)
        console.print(f"stopped {name}")
    return 0
