"""``layerline scale STAGE=N ...``: change how many replicas of a stage a running deployment runs."""

from __future__ import annotations

import argparse

from layerline.cli.output import console
from layerline.errors import EngineError

__all__ = ["parse_assignments", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scale",
        help="run N replicas of a stage of a running Redis deployment",
        description="Start new replicas of a stage (returns once they consume) or stop its newest ones "
        "(each finishes and hands on what it holds first; SIGKILL after --timeout). Needs a deployment "
        "with --transport redis; works from any terminal (it acts on the deployment's recorded "
        "processes).",
        epilog="examples:\n  layerline scale 1=3\n  layerline scale 0=2 2=2 --name vgg16\n"
        "  layerline scale 1=0        # stage 1's requests wait in its stream until it is scaled up",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("assignments", nargs="+", metavar="STAGE=N", help="stage index and replica count")
    p.add_argument("--name", help="the deployment (needed when several run)")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="s to wait for new replicas to consume, or for stopped ones to drain before SIGKILL (60)",
    )
    p.set_defaults(func=run, scale_parser=p)


def parse_assignments(items: list[str]) -> list[tuple[int, int]]:
    """``["1=3", "0=2"]`` → ``[(1, 3), (0, 2)]``; ValueError naming the bad item."""
    out = []
    for item in items:
        stage, sep, count = item.partition("=")
        if not sep or not stage.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"{item!r}: write STAGE=N with a stage index and a replica count, e.g. 1=3")
        out.append((int(stage), int(count)))
    stages = [s for s, _ in out]
    if len(set(stages)) != len(stages):
        raise ValueError(f"{' '.join(items)}: a stage is given twice")
    return out


def run(args: argparse.Namespace) -> int:
    from layerline.cli.autoscale_cmd import deployment_name
    from layerline.cli.status_cmd import engine_for, print_status, print_swarm_status
    from layerline.engines import processes
    from layerline.engines.state import load_state

    try:
        wanted = parse_assignments(args.assignments)
    except ValueError as exc:
        args.scale_parser.error(str(exc))
    name = deployment_name(args.name)
    engine = engine_for(name)
    if not hasattr(engine, "scaler"):
        raise EngineError(
            f"deployment {name!r} runs on the {engine.name} engine, which cannot scale stages yet"
        )
    scaler = engine.scaler(name)
    for stage, n in wanted:
        try:
            before = scaler.replicas(stage)
            with console.status(f"stage {stage}: {before} → {n} replicas ..."):
                scaler.scale(stage, n, timeout_s=args.timeout)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        console.print(f"stage {stage}: {before} → {scaler.replicas(stage)} replicas", highlight=False)
    state = load_state(name)
    auto = [p for p in state.processes if p.role == "autoscaler" and processes.is_running(p.pid)]
    if auto:
        bounds = state.extra.get("autoscale", {}).get("stages", [])
        limits = ", ".join(f"{k}: {b['min_replicas']}..{b['max_replicas']}" for k, b in enumerate(bounds))
        console.print(
            f"[yellow]note:[/] the deployment's autoscaler (pid {auto[0].pid}) keeps adjusting the counts "
            f"within its bounds ({limits})"
        )
    (print_swarm_status if state.engine == "swarm" else print_status)(engine.status(name))
    return 0
