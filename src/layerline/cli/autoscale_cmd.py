"""``layerline autoscale``: scale a running Redis deployment's stages on the length of their streams."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from layerline.cli.output import console
from layerline.errors import EngineError

if TYPE_CHECKING:
    from layerline.autoscale.policy import AutoscaleConfig, Decision

__all__ = [
    "add_autoscale_options",
    "autoscale_options_given",
    "config_from_args",
    "deployment_name",
    "register",
]

#: (option, dest, type, default, help) of the per-stage settings, shared with ``deploy --autoscale``.
_OPTIONS: tuple[tuple[str, str, Callable[[str], float], float, str], ...] = (
    ("--min", "as_min", int, 1, "fewest replicas per stage; 0 lets an idle stage scale to zero (1)"),
    ("--max", "as_max", int, 4, "most replicas per stage (4)"),
    ("--target", "as_target", float, 4.0, "backlog entries (lag + pending) per replica (4)"),
    ("--up-delay", "as_up_delay", float, 2.0, "s the backlog must stay high before scaling up (2)"),
    ("--down-delay", "as_down_delay", float, 30.0, "s a lower need must last before scaling down (30)"),
    ("--activation", "as_activation", int, 0, "backlog above which a stage at 0 replicas wakes (0)"),
)


def add_autoscale_options(parser: argparse.ArgumentParser, *, title: str | None = None) -> None:
    """The autoscaling settings; each per-stage one takes one value for every stage or one per stage."""
    group = parser.add_argument_group(title) if title else parser
    for flag, dest, _type, _default, text in _OPTIONS:
        group.add_argument(flag, dest=dest, metavar="N[,N...]", help=text)
    group.add_argument(
        "--interval", dest="as_interval", type=float, metavar="S", help="seconds between polls (0.5)"
    )
    group.add_argument(
        "--metrics-port",
        dest="as_metrics_port",
        type=int,
        metavar="PORT",
        help="serve Prometheus GET /metrics on this port",
    )


def _per_stage(
    text: str | None, kind: Callable[[str], float], default: float, stages: int, flag: str
) -> list:
    if text is None:
        return [default] * stages
    try:
        values = [kind(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give one number for every stage or one per stage") from None
    if len(values) == 1:
        values *= stages
    if len(values) != stages:
        raise ValueError(f"{flag} {text!r}: {len(values)} values for {stages} stages; give 1 or {stages}")
    return values


def config_from_args(args: argparse.Namespace, stages: int) -> AutoscaleConfig:
    """The :class:`~layerline.autoscale.policy.AutoscaleConfig` the options describe (ValueError naming
    the option when a value is bad)."""
    from layerline.autoscale.policy import AutoscaleConfig, StagePolicy

    columns = [
        _per_stage(getattr(args, dest), kind, default, stages, flag)
        for flag, dest, kind, default, _text in _OPTIONS
    ]
    policies = []
    for k, (low, high, target, up, down, activation) in enumerate(zip(*columns, strict=True)):
        try:
            policies.append(StagePolicy(low, high, target, up, down, activation))
        except ValueError as exc:
            raise ValueError(f"stage {k}: {exc}") from None
    return AutoscaleConfig(tuple(policies), args.as_interval if args.as_interval is not None else 0.5)


def autoscale_options_given(args: argparse.Namespace) -> list[str]:
    """The autoscaling options set on the command line."""
    flags = [(flag, dest) for flag, dest, *_ in _OPTIONS]
    flags += [("--interval", "as_interval"), ("--metrics-port", "as_metrics_port")]
    return [flag for flag, dest in flags if getattr(args, dest, None) is not None]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "autoscale",
        help="scale a Redis deployment's stages on their queue lengths until Ctrl-C",
        description="Poll each stage's Redis stream and start or stop its replicas, KEDA-style: "
        "ceil(backlog / target) replicas within [min, max], scaling up once the need has lasted "
        "--up-delay s and down once a lower need has lasted --down-delay s (docs/redis.md, Autoscaling). "
        "Runs in the foreground; `deploy --autoscale` runs it with the deployment instead.",
        epilog="examples:\n  layerline autoscale --name vgg16\n"
        "  layerline autoscale --name vgg16 --min 1 --max 1,4,1 --target 4 --up-delay 2 --down-delay 30\n"
        "  layerline autoscale --name vgg16 --min 0 --metrics-port 9100   # idle stages scale to zero",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", help="the deployment (needed when several run)")
    add_autoscale_options(p)
    p.set_defaults(func=run, autoscale_parser=p)


def deployment_name(name: str | None) -> str:
    """``name``, or the only deployment (EngineError when none or several run)."""
    from layerline.engines.state import list_deployments

    names = list_deployments()
    if name is not None:
        if name not in names:
            raise EngineError(f"no deployment named {name!r}; running: {', '.join(names) or 'none'}")
        return name
    if len(names) != 1:
        raise EngineError(
            "no deployment runs; start one with `layerline deploy ... --transport redis`"
            if not names
            else f"several deployments run ({', '.join(names)}); pass --name NAME"
        )
    return names[0]


def run(args: argparse.Namespace) -> int:
    from layerline.autoscale.service import run_autoscaler
    from layerline.engines import processes
    from layerline.engines.state import load_state

    name = deployment_name(args.name)
    state = load_state(name)
    try:
        config = config_from_args(args, len(state.stages))
    except ValueError as exc:
        args.autoscale_parser.error(str(exc))
    running = [p for p in state.processes if p.role == "autoscaler" and processes.is_running(p.pid)]
    if running:
        raise EngineError(
            f"deployment {name!r} already has an autoscaler (pid {running[0].pid}, started by deploy "
            "--autoscale); two would fight: stop this one or deploy without --autoscale"
        )

    def show(decision: Decision) -> None:
        console.print(
            f"stage {decision.stage}: {decision.current} → {decision.desired} replicas ({decision.reason})",
            highlight=False,
        )

    def started(url: str) -> None:
        where = f"; metrics at {url}" if url else ""
        console.print(
            f"autoscaling {name} every {config.interval_s:g} s{where}; Ctrl-C stops", highlight=False
        )

    run_autoscaler(
        name,
        config,
        metrics_port=args.as_metrics_port,
        on_decision=show,
        on_start=started,
    )
    console.print("autoscaler stopped")
    return 0
