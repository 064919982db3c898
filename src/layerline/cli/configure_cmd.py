"""``layerline configure``: the best placement of a profiled model's blocks on the profiled devices.

Reads a profile (``layerline benchmark``) and the sliced model it points to, builds the placement problem
(:mod:`layerline.plan.from_profile`), solves it exactly (:func:`layerline.plan.optimize`), and prints the
stages, the predicted latency and throughput and the baselines a user would otherwise choose. ``-o`` writes
a plan that ``layerline deploy PLAN`` runs; ``--picture`` draws the timeline of one request.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from layerline.cli.output import console, human_bytes, human_seconds, print_json

__all__ = ["build_report", "register"]

BASELINE_LABELS = {
    "all_on_source": "all on the source",
    "all_on_fastest": "all on the fastest device",
    "even_split": "even split by blocks",
    "best_two_way": "best two-way split",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "configure",
        help="plan the best placement of a profiled model on the profiled devices",
        description="Choose contiguous stages and a device for each, exactly, from measured block "
        "latencies, link latency/bandwidth and memory (a profile from `layerline benchmark`); compare with "
        "simple baselines; write a plan for `layerline deploy`.",
        epilog="examples:\n"
        "  layerline configure vgg16.profile.json --source edge1 -o vgg16.plan.json\n"
        "  layerline configure p.json --source cam --sink server --objective throughput --batch 4\n"
        "  layerline configure p.json --source edge1 --min-throughput 20 --picture timeline.svg\n"
        "  layerline configure p.json --source edge1 --pin 0-3=edge1 --forbid 10=edge2 --exclude edge3\n"
        "\nblock lists: '7', '0-3' (inclusive), '0-3,9'; --forbid takes several devices: 10=edge2,edge3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("profile", type=Path, help="a profile JSON written by `layerline benchmark`")
    p.add_argument("--source", required=True, help="the device where requests come from")
    p.add_argument("--sink", help="the device the output goes to (default: the source)")
    p.add_argument("--batch", type=int, default=1, help="batch size per request (1); must be profiled")
    p.add_argument(
        "--objective",
        choices=("latency", "throughput"),
        default="latency",
        help="latency: least end-to-end time; throughput: smallest slowest stage or link (latency)",
    )
    p.add_argument("--min-throughput", type=float, metavar="RPS", help="requests/s the plan must sustain")
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.8,
        help="share of a device's available memory a stage may use (0.8), unless the profile sets a budget",
    )
    p.add_argument("--pin", action="append", default=[], metavar="BLOCKS=DEV", help="run blocks on DEV")
    p.add_argument(
        "--forbid", action="append", default=[], metavar="BLOCKS=DEV[,DEV]", help="keep blocks off DEV"
    )
    p.add_argument("--exclude", action="append", default=[], metavar="DEV", help="run no stage on DEV")
    p.add_argument("-o", "--output", type=Path, help="write the plan here (for `layerline deploy PLAN`)")
    p.add_argument("--picture", type=Path, help="draw the timeline: .svg (or .png with matplotlib)")
    p.add_argument("--json", action="store_true", help="print one JSON document (plan + baselines)")
    p.set_defaults(func=run)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _ratio(a: float, b: float) -> float | None:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def _cli_hint(exc: Exception, fraction: float) -> Exception:
    """The optimiser's PlanError in the command's own terms (option names, where budgets come from)."""
    from layerline.errors import PlanError

    text = str(exc).replace("min_throughput_rps=", "--min-throughput ")
    if "memory" in text or "budget" in text:
        text += (
            f" (memory budgets are --memory-fraction {fraction} of each device's available memory "
            "unless the profile sets one; raise it if the devices have room)"
        )
    return PlanError(text)


def build_report(
    profile_path: Path,
    *,
    source: str,
    sink: str | None = None,
    batch: int = 1,
    objective: str = "latency",
    min_throughput_rps: float | None = None,
    memory_fraction: float = 0.8,
    pins: list[str] | tuple[str, ...] = (),
    forbid: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Plan from a profile file; the JSON-able report (``plan`` is a :class:`layerline.plan.Plan`)."""
    from layerline import __version__
    from layerline.errors import PlanError
    from layerline.graph import Manifest
    from layerline.plan import baselines, optimize
    from layerline.plan.from_profile import parse_exclude, parse_forbid, parse_pins, problem_from_profile
    from layerline.profile.format import load_profile

    started = time.perf_counter()
    profile = load_profile(profile_path)
    manifest = Manifest.load(Path(profile.sliced))
    n = manifest.num_blocks
    built = problem_from_profile(
        profile,
        manifest,
        source=source,
        sink=sink,
        batch=batch,
        memory_fraction=memory_fraction,
        pins=parse_pins(pins, n),
        forbid=parse_forbid(forbid, n),
        exclude=parse_exclude(exclude),
    )
    problem = built.problem
    try:
        best = optimize(problem, objective, min_throughput_rps=min_throughput_rps)
    except PlanError as exc:
        raise _cli_hint(exc, memory_fraction) from None
    others = baselines(problem)
    total = time.perf_counter() - started

    plan = best.to_plan(manifest.model_name, profile.sliced, created_by=f"layerline {__version__} configure")
    assert plan.predicted is not None
    plan.predicted.update({"batch": batch, "source": problem.source, "sink": problem.sink_device})
    budgets = {d.name: d.memory_budget_bytes for d in problem.devices}
    stages = [
        {
            "blocks": [s.start, s.stop],
            "device": s.device,
            "compute_s": s.compute_s,
            "overhead_s": s.overhead_s,
            "transfer_in_s": s.transfer_in_s,
            "memory_bytes": s.memory_bytes,
            "memory_budget_bytes": budgets[s.device],
        }
        for s in best.breakdown
    ]
    base_doc: dict[str, Any] = {}
    for name, result in others.items():
        if isinstance(result, PlanError):
            reason = str(result)
            if name == "all_on_source" and problem.source in built.unmeasured:
                reason = f"the source {problem.source!r} has no block measurements, so it runs no blocks"
            base_doc[name] = {"feasible": False, "reason": reason}
            continue
        base_doc[name] = {
            "feasible": True,
            "stages": [[s, t, d] for s, t, d in result.stages],
            "latency_s": result.latency_s,
            "bottleneck_s": result.bottleneck_s,
            "throughput_rps": _finite(result.throughput_rps),
            "latency_ratio": _ratio(result.latency_s, best.latency_s),
            "throughput_ratio": _ratio(result.throughput_rps, best.throughput_rps),
            "predicted": result.predicted(),
        }
    return {
        "plan": plan,
        "placement": best,
        "problem": problem,
        "model_name": manifest.model_name,
        "profile": str(profile_path),
        "num_blocks": n,
        "devices": list(problem.device_names),
        "batch": batch,
        "source": problem.source,
        "sink": problem.sink_device,
        "objective": objective,
        "min_throughput_rps": min_throughput_rps,
        "memory_fraction": memory_fraction,
        "predicted": {
            "latency_s": best.latency_s,
            "bottleneck_s": best.bottleneck_s,
            "throughput_rps": _finite(best.throughput_rps),
            "samples_per_s": _finite(best.throughput_rps * batch),
            "transfer_out_s": best.transfer_out_s,
        },
        "stages": stages,
        "solver": {
            "solve_time_s": best.solve_time_s,
            "total_time_s": total,
            "device_classes": best.device_classes,
            "states": best.states,
        },
        "baselines": base_doc,
        "notes": list(built.notes),
    }


def run(args: argparse.Namespace) -> int:
    from layerline.plan import save_plan
    from layerline.plan.timeline import save_timeline

    report = build_report(
        args.profile,
        source=args.source,
        sink=args.sink,
        batch=args.batch,
        objective=args.objective,
        min_throughput_rps=args.min_throughput,
        memory_fraction=args.memory_fraction,
        pins=args.pin,
        forbid=args.forbid,
        exclude=args.exclude,
    )
    plan = report["plan"]
    if args.picture is not None:
        title = f"{report['model_name']}: {report['objective']} plan, batch {report['batch']}"
        save_timeline(report["placement"], args.picture, report["source"], report["sink"], title)
    if args.output is not None:
        save_plan(plan, args.output)
    if args.json:
        doc = {k: v for k, v in report.items() if k not in ("plan", "placement", "problem")}
        doc["plan"] = plan.to_json()
        doc["plan_file"] = None if args.output is None else str(args.output)
        doc["picture"] = None if args.picture is None else str(args.picture)
        print_json(doc)
        return 0
    _print_report(report)
    if args.output is not None:
        console.print(f"plan written to {args.output}    run it: layerline deploy {args.output}")
    else:
        console.print("add -o PLAN.json to write the plan for `layerline deploy`")
    if args.picture is not None:
        console.print(f"timeline written to {args.picture}")
    return 0


def _print_report(report: dict[str, Any]) -> None:
    batch = report["batch"]
    table = Table(
        title=f"{report['model_name']}: {report['objective']} plan, batch {batch}, "
        f"{report['source']} → … → {report['sink']}"
    )
    for col, justify in (
        ("stage", "right"),
        ("blocks", "left"),
        ("device", "left"),
        ("compute", "right"),
        ("hop overhead", "right"),
        ("transfer in", "right"),
        ("memory / budget", "right"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for i, s in enumerate(report["stages"]):
        start, stop = s["blocks"]
        budget = s["memory_budget_bytes"]
        mem = f"{human_bytes(s['memory_bytes'])} / {'unlimited' if budget is None else human_bytes(budget)}"
        table.add_row(
            str(i),
            f"{start}-{stop - 1}" if stop - start > 1 else str(start),
            s["device"],
            human_seconds(s["compute_s"]),
            human_seconds(s.get("overhead_s", 0.0)),
            human_seconds(s["transfer_in_s"]),
            mem,
        )
    console.print(table)
    pred = report["predicted"]
    console.print(f"transfer out to {report['sink']}: {human_seconds(pred['transfer_out_s'])}")
    console.print(
        f"predicted latency [bold]{human_seconds(pred['latency_s'])}[/], throughput "
        f"[bold]{_rps(pred['throughput_rps'])}[/]"
        + (f" ({_rps(pred['samples_per_s'], 'samples/s')})" if batch > 1 else "")
        + f", slowest step {human_seconds(pred['bottleneck_s'])}"
    )
    solver = report["solver"]
    console.print(
        f"solver: {report['num_blocks']} blocks × {len(report['devices'])} devices "
        f"({solver['device_classes']} device groups, {solver['states']} states) in "
        f"{human_seconds(solver['solve_time_s'])}; total with loading and baselines "
        f"{human_seconds(solver['total_time_s'])}"
    )
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")

    base = Table(title="baselines (ratio: baseline ÷ this plan)")
    for col in ("baseline", "stages", "latency", "× latency", "throughput", "× throughput"):
        base.add_column(col, justify="left" if col in ("baseline", "stages") else "right")
    from layerline.plan.from_profile import stage_summary

    for name, b in report["baselines"].items():
        label = BASELINE_LABELS.get(name, name)
        if not b["feasible"]:
            base.add_row(label, "[red]infeasible[/]: " + b["reason"], "-", "-", "-", "-")
            continue
        base.add_row(
            label,
            stage_summary([tuple(s) for s in b["stages"]]),
            human_seconds(b["latency_s"]),
            _x(b["latency_ratio"]),
            _rps(b["throughput_rps"]),
            _x(b["throughput_ratio"]),
        )
    console.print(base)


def _rps(x: float | None, unit: str = "requests/s") -> str:
    return "unbounded" if x is None else f"{x:.3g} {unit}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}×"
