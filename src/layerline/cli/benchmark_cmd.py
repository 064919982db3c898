"""``layerline benchmark``: measure block latency, memory and links on every device of a cluster."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from layerline.cli.output import console, console_err, human_bytes, human_seconds, print_json
from layerline.errors import FormatError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="profile a sliced model's blocks and the links on a cluster of devices",
        description="Start a profiling agent per device, time every block (median and p90 over repeats after "
        "warm-up), measure its memory, and measure every ordered pair of devices with real transfers. "
        "Writes a profile JSON (docs/profile.md); a re-run re-measures only what changed.",
        epilog="examples:\n  layerline benchmark vgg16.sliced -o vgg16.profile.json\n"
        "  layerline benchmark vgg16.sliced --cluster cluster.yaml --batch 1 --batch 8 -o prof.json\n"
        "  layerline benchmark bert.sliced --dim sequence=128 -o bert.profile.json --refresh\n"
        "  layerline benchmark vgg16.sliced --testbed -o vgg16.fleet.json   # every device of the testbed\n"
        "  layerline benchmark vgg16.sliced --engine swarm -o vgg16.profile.json   # every swarm node",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sliced", type=Path, help="a sliced model directory (from `layerline slice`)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster", type=Path, help="cluster YAML (default: this machine as one device 'local')"
    )
    where.add_argument(
        "--testbed",
        action="store_true",
        help="every device of the running emulated testbed (`layerline testbed up`), in fleet order",
    )
    where.add_argument(
        "--engine",
        choices=("swarm",),
        help="swarm: every ready node of the Docker Swarm (run on a manager), one agent service per node",
    )
    p.add_argument("--docker-host", help="swarm: the manager's Docker socket (default: docker's own default)")
    p.add_argument("--image", help="swarm: the worker image the agents run (default layerline-worker:latest)")
    p.add_argument("--device", action="append", help="swarm: only these devices (node label or hostname)")
    p.add_argument("-o", "--output", type=Path, help="profile file to write (default SLICED.profile.json)")
    p.add_argument("--batch", type=int, action="append", help="batch size to time (repeatable; default 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per block and batch (20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (3)")
    p.add_argument("--pings", type=int, default=20, help="round trips per link (20)")
    p.add_argument("--transfer-repeats", type=int, default=3, help="transfers per size per link (3)")
    p.add_argument("--threads", type=int, help="onnxruntime threads per block (default: the device's cores)")
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="size of a dynamic non-batch input dimension (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds an agent may take to start (30)")
    p.add_argument("--refresh", action="store_true", help="re-measure everything, even unchanged parts")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of the table")
    p.set_defaults(func=run)


def _dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise FormatError(
                f"--dim {item!r} must be NAME=VALUE with a positive integer, e.g. --dim seq=128"
            )
        dims[name] = int(value)
    return dims


class _Bars:
    """One rich progress bar per device, plus one for the links (on stderr: stdout stays JSON)."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress
        self.tasks: dict[str, int] = {}

    def start(self, key: str, total: int) -> None:
        self.tasks[key] = self.p.add_task(key, total=max(total, 1), note="")

    def update(self, key: str, done: int, total: int) -> None:
        self.p.update(self.tasks[key], completed=done, total=max(total, 1))

    def finish(self, key: str, ok: bool, note: str = "") -> None:
        self.p.update(self.tasks[key], note=note or ("done" if ok else "failed"))


def run(args: argparse.Namespace) -> int:
    from layerline.profile import (
        BenchmarkOptions,
        default_cluster,
        load_cluster,
        load_profile,
        run_benchmark,
        save_profile,
    )

    agents = None
    if args.testbed:
        from layerline.profile.testbed_devices import running_testbed, testbed_cluster

        cluster = testbed_cluster(running_testbed())
    elif args.engine == "swarm":
        from layerline.engines.swarm.agents import SwarmAgents, swarm_cluster
        from layerline.engines.swarm.docker import DockerCli
        from layerline.engines.swarm.image import DEFAULT_WORKER_IMAGE

        docker = DockerCli(args.docker_host)
        cluster = swarm_cluster(docker, args.device)
        agents = SwarmAgents(docker, args.image or DEFAULT_WORKER_IMAGE)
    else:
        cluster = load_cluster(args.cluster) if args.cluster else default_cluster()
    out = args.output or args.sliced.with_name(args.sliced.name + ".profile.json")
    try:
        opts = BenchmarkOptions(
            batch_sizes=tuple(args.batch or [1]),
            warmup=args.warmup,
            repeats=args.repeats,
            pings=args.pings,
            transfer_repeats=args.transfer_repeats,
            threads=args.threads,
            dims=_dims(args.dim),
            refresh=args.refresh,
            start_timeout_s=args.timeout,
        )
    except ValueError as exc:
        raise FormatError(f"bad benchmark option: {exc}") from None
    previous = None
    if out.exists() and not args.refresh:
        try:
            previous = load_profile(out)
        except FormatError as exc:
            console_err.print(
                f"[yellow]warning:[/] ignoring the existing {out} ({exc}); measuring everything"
            )
    columns = (
        TextColumn("{task.description:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console_err, transient=False) as progress:
        profile = run_benchmark(args.sliced, cluster, opts, previous, _Bars(progress), agents)
    save_profile(profile, out)
    if args.json:
        print_json(profile.to_json())
    else:
        _print_table(profile, out)
    if profile.failures:
        console_err.print(
            f"[bold red]{len(profile.failures)} measurement(s) failed[/] (the rest is saved in {out}):"
        )
        for f in profile.failures:
            console_err.print(f"  {f.device} ({f.what}): {f.error}")
        return 1
    return 0


def _print_table(profile, out: Path) -> None:
    table = Table(title=f"{profile.model_name}: profile → {out}")
    table.add_column("device")
    for col in (
        "batch",
        "compute (sum of block medians)",
        "sustained (sum of means)",
        "block memory (max)",
        "memory budget",
        "cores",
    ):
        table.add_column(col, justify="right")
    for d in profile.devices:
        for batch in profile.batch_sizes:
            ms = [m for m in profile.blocks if m.device == d.name and m.batch == batch]
            total = sum(m.latency_s.median for m in ms)
            sustained = sum(m.latency_s.sustained for m in ms)
            mem = max((m.memory_bytes.weights + m.memory_bytes.activations_peak for m in ms), default=0)
            quota = f" (quota {d.cpu_quota:g})" if d.cpu_quota else ""
            table.add_row(
                d.name,
                str(batch),
                human_seconds(total),
                human_seconds(sustained),
                human_bytes(mem),
                human_bytes(d.memory_budget_bytes),
                f"{d.cores}{quota}",
            )
    console.print(table)
    if profile.links:
        links = Table(title="links")
        for col in ("src → dst", "RTT median", "one-way latency", "bandwidth", "sizes tested"):
            links.add_column(col, justify="right")
        for lk in profile.links:
            links.add_row(
                f"{lk.src} → {lk.dst}",
                human_seconds(lk.rtt_median_s),
                human_seconds(lk.one_way_latency_s),
                f"{human_bytes(lk.bandwidth_Bps)}/s",
                ", ".join(human_bytes(s) for s in lk.transfer_sizes_bytes),
            )
        console.print(links)
