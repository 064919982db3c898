"""Prediction vs reality: the planner's predicted latency against the measured latency of the deployed plan.

Run: ``python bench/bench_prediction.py [--model vgg16] [--workdir DIR] [--requests 50] [--json out.json]``
(root and a cgroup v1 cpu controller needed: the three devices are CPU quotas on this machine), or with
``--testbed`` on a 3-device emulated testbed with shaped links (root, cgroup v1 cpu + memory, iproute2,
iptables; docs/testbed.md).

1. Build and slice the example model (cached in ``--workdir``).
2. Write a 3-device cluster on this machine, ``edge`` / ``mid`` / ``server`` with distinct ``cpu_quota``
   (``--quotas``), and profile it with ``run_benchmark`` (what ``layerline benchmark`` does). With
   ``--testbed``: bring up a testbed with those three devices instead (``--quotas`` cores, ``--links``
   bandwidth and receive delay, ``--device-memory``), waiting (bounded) while another testbed holds the
   subnet, and profile its devices (agents inside the devices; links are the shaped links). The testbed is
   taken down at the end, also on errors, Ctrl-C and SIGTERM.
3. Plan for latency from ``--source`` (``build_report``, what ``layerline configure`` does): the optimum and
   the baselines (all on the source, all on the fastest, even split, best two-way).
4. Deploy each distinct feasible plan with the cluster (``LocalEngine.deploy(..., cluster=...)``, what
   ``layerline deploy PLAN --cluster`` does), send ``--warmup`` then ``--requests`` requests one at a time
   through the HTTP gateway, and take the median. The gateway's ``/metrics`` give the mean compute time of
   each stage as the workers measured it, to say where a miss comes from. On the testbed the workers and
   the gateway run inside the devices (the gateway in the source's), stage to stage traffic crosses the
   shaped links, and the requests come from this host through its port on the fleet's bridge.
5. Print predicted vs measured per plan, each device's measured hop overhead and (testbed) the measured
   links; target: the optimum within 15 % of its prediction and faster than every baseline.

Every deployment is stopped in a ``finally``; each plan's measurement is bounded by ``--max-plan-s``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    LoadMeter,
    TestbedLoadMeter,
    cached_sliced_example,
    interrupts_deferred,
    loadavg,
    machine_info,
    metric_mean,
    metric_sums,
    print_table,
    sigterm_as_interrupt,
    summarize,
    up_testbed_when_free,
    wait_idle,
)

from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.processes import free_port
from layerline.engines.stages import resolve_target
from layerline.examples import EXAMPLES
from layerline.graph import Manifest
from layerline.plan import Plan, PlanStage, save_plan
from layerline.profile.cgroup import check_cpu_quota
from layerline.profile.cluster import Cluster, load_cluster
from layerline.profile.controller import BenchmarkOptions, run_benchmark
from layerline.profile.format import load_profile, save_profile
from layerline.serve.client import GatewayClient

TARGET = 0.15
TIMEOUT_S = 120.0
#: the testbed's links: edge and mid on a gigabit LAN, the server behind 100 Mbit with 5 ms receive delay
DEFAULT_LINKS = "edge=1gbit,mid=1gbit,server=100mbit/5ms"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def prepare(model: str, workdir: Path) -> Path:
    return cached_sliced_example(model, workdir, say)[1]


def write_cluster(path: Path, quotas: dict[str, float], memory_mb: dict[str, float]) -> Path:
    lines = ["devices:"]
    for name, quota in quotas.items():
        lines += [f"  - name: {name}", f"    cpu_quota: {quota}"]
        if name in memory_mb:
            lines.append(f"    memory_bytes: {int(memory_mb[name] * 1024 * 1024)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def testbed_fleet(args: argparse.Namespace) -> dict[str, Any]:
    """The fleet of ``--testbed``: one device per ``--quotas`` entry, its link from ``--links``."""
    devices = []
    for name, quota in args.quota_map.items():
        rate, _, delay = args.link_map.get(name, "1gbit").partition("/")
        link = {"rate": rate, **({"delay": delay} if delay else {})}
        devices.append({"name": name, "cpu": quota, "memory": args.device_memory, "link": link})
    return {"name": "bench-prediction", "devices": devices}


def testbed_cluster(state: Any, memory_mb: dict[str, float]) -> Cluster:
    """The testbed's devices as a cluster, with the ``--memory-mb`` planning budgets."""
    from layerline.profile.testbed_devices import testbed_device

    devices = tuple(
        testbed_device(
            state,
            d.spec.name,
            memory_bytes=int(memory_mb[d.spec.name] * 1024 * 1024) if d.spec.name in memory_mb else None,
        )
        for d in state.devices
    )
    return Cluster(devices, testbed=state)


def profile(sliced: Path, cluster: Cluster, workdir: Path, args: argparse.Namespace) -> Path:
    """Profile the cluster (kept in the workdir: devices whose quota is unchanged are not re-measured).

    On the testbed the file is named after the fleet, so a profile is only reused for the same links.
    """
    tag = ""
    if args.testbed:
        tag = ".testbed-" + hashlib.sha256(json.dumps(args.fleet, sort_keys=True).encode()).hexdigest()[:8]
    out = workdir / f"{args.model}{tag}.profile.json"
    previous = load_profile(out) if out.is_file() and not args.refresh else None
    say("profiling the cluster" + (" (reusing unchanged devices)" if previous else ""))
    started = time.monotonic()
    prof = run_benchmark(sliced, cluster, BenchmarkOptions(repeats=args.profile_repeats), previous=previous)
    if prof.failures:
        raise SystemExit(f"the benchmark failed: {[f.message for f in prof.failures]}")
    save_profile(prof, out)
    say(f"profile written to {out} in {time.monotonic() - started:.0f} s")
    return out


def plans(report: dict[str, Any], sliced: Path, source: str) -> list[tuple[str, Plan]]:
    """The optimum and every distinct feasible baseline, as plans that carry their predicted latency."""
    n = report["num_blocks"]
    model = report["model_name"]
    out: list[tuple[str, Plan]] = [("optimal", report["plan"])]
    seen = {tuple((s.start, s.stop, s.device) for s in report["plan"].stages): "optimal"}
    for name, base in report["baselines"].items():
        if not base["feasible"]:
            say(f"baseline {name} is infeasible: {base['reason']}")
            continue
        key = tuple(tuple(s) for s in base["stages"])
        if key in seen:
            say(f"baseline {name} is the same placement as {seen[key]}: measured once")
            continue
        seen[key] = name
        predicted = dict(base["predicted"], source=source, sink=source)
        stages = tuple(PlanStage((s, t), d) for s, t, d in key)
        out.append((name, Plan(model, str(sliced), stages, n, "manual", predicted)))
    return out


def measure(
    label: str, plan: Plan, cluster: Cluster, workdir: Path, inputs: dict, args: argparse.Namespace
) -> dict[str, Any]:
    path = workdir / "plans" / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_plan(plan, path)
    target = resolve_target(path, None)
    engine = LocalEngine()
    name = f"pred-{os.getpid()}-{label}".replace("_", "-")
    settings = DeploySettings(name=name, port=free_port(), request_timeout_s=TIMEOUT_S, ready_timeout_s=300.0)
    say(f"{label}: deploying {[(s.start, s.stop, s.device) for s in plan.stages]}")
    deployed = False
    try:
        state = engine.deploy(target, settings, cluster=cluster)
        deployed = True
        client = GatewayClient(state.url, timeout_s=TIMEOUT_S, model=name)
        for _ in range(args.warmup):
            client.infer(inputs)
        if args.wait_idle:
            wait_idle(args.wait_idle)
        pids = [p.pid for p in state.processes] + [os.getpid()]
        for attempt in range(args.retries + 1):
            before = metric_sums(client.metrics())
            times: list[float] = []
            until = time.monotonic() + args.max_plan_s
            meter = TestbedLoadMeter(cluster.testbed, pids) if cluster.testbed else LoadMeter(pids)
            with meter:
                for _ in range(args.requests):
                    if time.monotonic() > until:
                        say(f"{label}: stopped after {len(times)} requests (--max-plan-s)")
                        break
                    t0 = time.perf_counter()
                    client.infer(inputs)
                    times.append(time.perf_counter() - t0)
            after = metric_sums(client.metrics())
            if meter.result["others"] <= args.max_others or attempt == args.retries:
                break
            say(f"{label}: other processes used {meter.result['others']:.2f} cores; measuring again")
            if args.wait_idle:
                wait_idle(args.wait_idle)
        compute = [
            metric_mean(before, after, "layerline_stage_compute_seconds", str(i))
            for i in range(len(plan.stages))
        ]
        gateway = metric_mean(before, after, "layerline_request_seconds", "")
        threads = [s.get("threads") for s in state.stages]
    finally:
        if deployed:
            engine.down(name)
    assert plan.predicted is not None
    predicted = float(plan.predicted["latency_s"])
    median = statistics.median(times)
    result = {
        "label": label,
        "stages": [[s.start, s.stop, s.device] for s in plan.stages],
        "threads": threads,
        "predicted_s": predicted,
        "predicted_stages": plan.predicted.get("stages"),
        "predicted_transfer_out_s": plan.predicted.get("transfer_out_s"),
        "measured": summarize(times),
        "ratio": median / predicted,
        "stage_compute_mean_s": compute,
        "gateway_request_mean_s": gateway,
        "load": meter.result,
        "loadavg": loadavg(),
        "attempts": attempt + 1,
    }
    say(f"{label}: predicted {ms(predicted)}, measured median {ms(median)} ({median / predicted:.3f}×)")
    return result


def stage_text(stages: list[list[Any]]) -> str:
    return " | ".join(f"{s}-{t - 1}@{d}" if t - s > 1 else f"{s}@{d}" for s, t, d in stages)


def report(results: dict[str, Any]) -> None:
    rows = []
    measured = results["plans"]
    best = min(measured, key=lambda r: r["measured"]["median"])
    for r in measured:
        rows.append(
            [
                r["label"],
                stage_text(r["stages"]),
                ms(r["predicted_s"]),
                ms(r["measured"]["median"]),
                ms(r["measured"]["p90"]),
                f"{r['ratio']:.3f}",
                "yes" if r is best else "",
            ]
        )
    where = f"testbed {results['testbed']['testbed_id']}, " if results.get("testbed") else ""
    print_table(
        f"{results['model']}: predicted vs measured latency, batch 1, source {results['source']} "
        f"({where}quotas {results['quotas']})",
        ["plan", "stages (blocks@device)", "predicted", "measured median", "p90", "measured/pred", "fastest"],
        rows,
    )
    rows = []
    for r in measured:
        pred = r["predicted_stages"] or []
        for i, (p, c) in enumerate(zip(pred, r["stage_compute_mean_s"], strict=False)):
            rows.append(
                [
                    r["label"] if i == 0 else "",
                    f"{i}: {stage_text([[*p['blocks'], p['device']]])}",
                    r["threads"][i],
                    ms(p["compute_s"]),
                    ms(c),
                    "-" if c is None else f"{c / p['compute_s']:.3f}",
                    ms(p.get("overhead_s")),
                    ms(p["transfer_in_s"]),
                ]
            )
        transfer = sum(p["transfer_in_s"] for p in pred) + (r["predicted_transfer_out_s"] or 0.0)
        overhead = sum(p.get("overhead_s") or 0.0 for p in pred)
        rows.append(
            [
                "",
                "gateway mean / client median",
                "",
                "",
                f"{ms(r['gateway_request_mean_s'])} / {ms(r['measured']['median'])}",
                "",
                f"{ms(overhead)} all",
                f"{ms(transfer)} all links",
            ]
        )
    print_table(
        "per stage: predicted compute vs the workers' own mean compute time",
        [
            "plan",
            "stage",
            "threads",
            "predicted",
            "measured mean",
            "ratio",
            "hop overhead",
            "pred. transfer in",
        ],
        rows,
    )
    opt = next(r for r in measured if r["label"] == "optimal")
    within = abs(opt["ratio"] - 1.0) <= TARGET
    fastest = all(opt["measured"]["median"] < r["measured"]["median"] for r in measured if r is not opt)
    print(
        f"optimal plan: measured/predicted {opt['ratio']:.3f} "
        f"({'within' if within else 'OUTSIDE'} ±{TARGET:.0%}); "
        f"{'faster than every baseline' if fastest else 'NOT faster than every baseline'}"
    )
    loads = [r["load"]["others"] for r in measured]
    print(f"other processes on the machine during the measurements: {min(loads):.2f}–{max(loads):.2f} cores")
    avgs = [r["loadavg"][0] for r in measured if r.get("loadavg")]
    if avgs:
        print(f"1-minute load average after each plan: {min(avgs):.2f}–{max(avgs):.2f}")


def report_profile(results: dict[str, Any]) -> None:
    """Each device's quota, planning budget and measured hop overhead; on the testbed, the measured links."""
    rows = [
        [
            d["name"],
            "-" if d["cpu_quota"] is None else f"{d['cpu_quota']:g}",
            f"{d['memory_budget_bytes'] / 2**20:.0f}",
            "-" if d.get("hop_overhead_s") is None else f"{d['hop_overhead_s'] * 1e3:.3f}",
        ]
        for d in results["profile"]["devices"]
    ]
    print_table(
        "devices (profile): hop_overhead_s is what the planner adds per stage on the device",
        ["device", "cpu quota", "memory budget MiB", "hop_overhead_s (ms)"],
        rows,
    )
    links = results["profile"]["links"]
    if results.get("testbed") and links:
        rows = [
            [
                f"{lk['src']} -> {lk['dst']}",
                f"{lk['rtt_s']['median'] * 1e3:.2f}",
                f"{lk['one_way_latency_s'] * 1e3:.2f}",
                f"{lk['bandwidth_Bps'] * 8 / 1e6:.1f}",
            ]
            for lk in links
        ]
        print_table(
            "links (profile, measured between the devices)",
            ["link", "RTT median ms", "one-way ms (planned)", "bandwidth Mbit/s"],
            rows,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(EXAMPLES), default="vgg16")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/layerline-bench-prediction"))
    p.add_argument(
        "--quotas",
        default="edge=0.35,mid=0.6,server=1.0",
        help="device=cores,... (cgroup v1 cpu quotas; the first is the default source)",
    )
    p.add_argument("--source", help="where requests come from (default: the first device)")
    p.add_argument(
        "--memory-mb", action="append", default=[], metavar="DEV=MB", help="a device's memory budget"
    )
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-repeats", type=int, default=20)
    p.add_argument("--refresh", action="store_true", help="profile every device again")
    p.add_argument("--max-plan-s", type=float, default=240.0, help="time limit of one plan's requests")
    p.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S s for a quiet machine per plan")
    p.add_argument(
        "--max-others", type=float, default=0.25, help="measure a plan again when other processes used more"
    )
    p.add_argument("--retries", type=int, default=2, help="how often to measure a disturbed plan again")
    p.add_argument("--json", type=Path)
    tb = p.add_argument_group("testbed", "run the devices on an emulated testbed (docs/testbed.md)")
    tb.add_argument("--testbed", action="store_true", help="devices with shaped links instead of quotas here")
    tb.add_argument(
        "--links",
        default=DEFAULT_LINKS,
        help="device=RATE[/DELAY],... each device's link: bandwidth and the delay of what it receives",
    )
    tb.add_argument("--device-memory", default="1536M", help="each testbed device's memory limit")
    tb.add_argument("--wait-testbed-s", type=float, default=600.0, help="wait for another testbed to go")
    args = p.parse_args(argv)
    args.quota_map = {k: float(v) for k, v in (kv.split("=") for kv in args.quotas.split(","))}
    args.memory_map = {k: float(v) for k, v in (kv.split("=") for kv in args.memory_mb)}
    args.link_map = dict(kv.split("=") for kv in args.links.split(","))
    args.source = args.source or next(iter(args.quota_map))
    return args


def run_on(cluster: Cluster, sliced: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Profile ``cluster``, plan, and deploy and measure every distinct plan on it (into ``results``)."""
    from layerline.cli.configure_cmd import build_report

    started = time.monotonic()
    profile_path = profile(sliced, cluster, args.workdir, args)
    results["profile_s"] = time.monotonic() - started
    prof = json.loads(profile_path.read_text())
    results["profile"] = {"devices": prof["devices"], "links": prof.get("links", [])}
    rep = build_report(profile_path, source=args.source)
    stages = [(s.start, s.stop, s.device) for s in rep["plan"].stages]
    say(f"optimum: {stages}, predicted {ms(rep['predicted']['latency_s'])}")
    inputs = EXAMPLES[args.model].sample_inputs(1, np.random.default_rng(0))
    for label, plan in plans(rep, sliced, args.source):
        results["plans"].append(measure(label, plan, cluster, args.workdir, inputs, args))


def run_on_testbed(sliced: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Bring up the fleet, :func:`run_on` its devices, and always take it down."""
    from layerline.testbed import FleetSpec, down
    from layerline.testbed.host import missing_requirements

    missing = missing_requirements()
    if missing:
        raise SystemExit("; ".join(missing))
    home = Path(tempfile.mkdtemp(prefix="bench-pred-home-"))
    os.environ["LAYERLINE_HOME"] = str(home)  # the testbed and the deployments' directories
    sigterm_as_interrupt()
    described = ", ".join(
        f"{d['name']} {d['cpu']:g} core {d['link']['rate']}"
        + (f" +{d['link']['delay']}" if "delay" in d["link"] else "")
        for d in args.fleet["devices"]
    )
    say(f"bringing up the testbed: {described} (home {home})")
    state, waited, up_s = up_testbed_when_free(
        FleetSpec.from_yaml_data(args.fleet), home, say, args.wait_testbed_s
    )
    results["testbed"] = {
        "testbed_id": state.testbed_id,
        "fleet": args.fleet,
        "up_s": up_s,
        "waited_s": waited,
    }
    say(f"testbed {state.testbed_id} up in {up_s:.1f} s (waited {waited:.0f} s for the subnet)")
    try:
        run_on(testbed_cluster(state, args.memory_map), sliced, args, results)
    finally:
        with interrupts_deferred():
            t0 = time.monotonic()
            down(home)
            results["testbed"]["down_s"] = time.monotonic() - t0
            shutil.rmtree(home, ignore_errors=True)
            say(f"testbed down in {results['testbed']['down_s']:.1f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.testbed:
        for device, quota in args.quota_map.items():
            check_cpu_quota(device, quota)
    args.workdir.mkdir(parents=True, exist_ok=True)
    sliced = prepare(args.model, args.workdir)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "model": args.model,
        "blocks": Manifest.load(sliced).num_blocks,
        "source": args.source,
        "quotas": args.quota_map,
        "memory_mb": args.memory_map,
        "loadavg_start": loadavg(),
        "plans": [],
    }
    try:
        if args.testbed:
            args.fleet = testbed_fleet(args)
            run_on_testbed(sliced, args, results)
        else:
            cluster_path = write_cluster(args.workdir / "cluster.yaml", args.quota_map, args.memory_map)
            run_on(load_cluster(cluster_path), sliced, args, results)
    finally:  # what was measured, also when a later step failed
        if "profile" in results:
            report_profile(results)
        if any(r["label"] == "optimal" for r in results["plans"]):
            report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
