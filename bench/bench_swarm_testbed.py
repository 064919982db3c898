"""Swarm engine vs local engine on the emulated testbed: the same 3-stage plan on the same 3 devices.

Run (root, cgroup v1, docker.io, debootstrap): ``python bench/bench_swarm_testbed.py [--model vgg16]
[--batch 1] [--requests 50] [--json out.json] [--keep]``.

1. Builds and slices the example model (cached in ``--workdir``) and writes one plan: the model split into 3
   stages balanced by estimated FLOPs (what ``layerline deploy --stages 3`` runs), stage ``i`` on device
   ``n{i+1}``, one onnxruntime thread per stage, requests from ``n1``. Checks that the stages fit the
   devices' memory (both deployments are up at once) before anything starts.
2. Brings up a 3-device testbed, every device ``swarm: true`` (one dockerd each, one swarm), timing ``up``;
   waits (bounded) while another testbed holds the subnet. The testbed is always taken down at the end
   (``finally``; also on Ctrl-C and SIGTERM), unless ``--keep``, and ``down`` is timed.
3. Builds the worker and gateway images on ``n1``'s dockerd (``ensure_test_images``: a debootstrapped
   bookworm base, the wheels cached) and copies them to ``n2`` and ``n3`` (``layerline.testbed.load_image``),
   timing both and reading the images' sizes (``docker image inspect --format {{.Size}}``).
4. Deploys the plan with the swarm engine (``SwarmEngine`` on ``n1``, the manager), then with the local
   engine on the same devices (``LocalEngine`` + the testbed cluster: workers inside the devices), each
   timed from the call to a ready chain. Both stay up; the requests alternate between them (which goes first
   alternates too), so a change in the machine's load hits both alike: ``--warmup`` untimed requests each,
   then ``--requests`` each from this host, one at a time, bounded by ``--max-measure-s``. The gateways'
   ``/metrics`` give each stage's mean compute time as its worker measured it.
5. Prints the testbed and image timings, deploy time and latency (the local engine is the baseline: the
   swarm/local ratio), per-stage compute, and how busy the rest of the machine was in every phase.

Both deployments are taken down in a ``finally`` before the testbed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    MIB,
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
)

from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.stages import resolve_target
from layerline.examples import EXAMPLES
from layerline.graph import Manifest
from layerline.plan import Plan, PlanStage, save_plan
from layerline.serve.client import GatewayClient

DEVICES = ("n1", "n2", "n3")
#: (cores, memory) per device: n3 holds VGG16's last stage (fc1-fc3, 517 MiB of weights) twice
DEFAULT_CPU = "1.0,0.5,0.4"
DEFAULT_MEMORY = "1536M,1G,2G"
SWARM_PORT = 9100  # gateway 9100, results 9101, artifacts 9102, stages 9103-9105 (on each node's address)
LOCAL_PORT = 8765
#: resident memory of a worker besides its weights (Python, numpy, onnxruntime), a dockerd's, a gateway's
WORKER_BASE = 150 * MIB
DOCKERD = 64 * MIB
GATEWAY = 80 * MIB
TIMEOUT_S = 120.0


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def size_bytes(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def fleet(args: argparse.Namespace) -> dict[str, Any]:
    link = {"rate": args.rate, "delay": args.delay}
    return {
        "name": "bench-swarm",
        "link": link,
        "devices": [
            {"name": name, "cpu": cpu, "memory": mem, "swarm": True}
            for name, cpu, mem in zip(DEVICES, args.cpu, args.memory, strict=True)
        ],
    }


def write_plan(sliced: Path, model: str, workdir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """3 FLOP-balanced stages, stage i on n{i+1}, one thread each, source n1; with each stage's weights."""
    manifest = Manifest.load(sliced)
    ranges = resolve_target(sliced, len(DEVICES)).ranges
    stages = tuple(PlanStage(r, dev, 1) for r, dev in zip(ranges, DEVICES, strict=True))
    plan = Plan(model, str(sliced), stages, manifest.num_blocks, predicted={"source": DEVICES[0]})
    path = workdir / f"{model}-swarm-trio.plan.json"
    save_plan(plan, path)
    info = [
        {
            "blocks": [start, stop],
            "device": dev,
            "weight_bytes": sum(b.weight_bytes for b in manifest.blocks[start:stop]),
        }
        for (start, stop), dev in zip(ranges, DEVICES, strict=True)
    ]
    return path, info


def check_memory(stages: list[dict[str, Any]], memory: list[str], model: str) -> None:
    """Both deployments at once: one worker loading (~2 x weights) while the other holds its weights."""
    for i, stage in enumerate(stages):
        w = stage["weight_bytes"]
        need = 2 * w + 1.2 * w + 2 * WORKER_BASE + DOCKERD + (2 * GATEWAY + WORKER_BASE if i == 0 else 0)
        have = size_bytes(memory[i])
        stage["memory_estimate_bytes"] = int(need)
        if need > have:
            raise SystemExit(
                f"stage {i} (blocks {stage['blocks'][0]}-{stage['blocks'][1] - 1}, {w / MIB:.0f} MiB of "
                f"weights) needs about {need / MIB:.0f} MiB on {DEVICES[i]} (two workers, one loading, and "
                f"its dockerd) but the device has {memory[i]}: raise --memory, or use --model vgg16-tiny "
                f"--batch 16 ({model} does not fit)"
            )


def image_size(docker: Any, tag: str) -> int:
    return int(docker.run(["image", "inspect", "--format", "{{.Size}}", tag]).strip())


def build_images(state: Any, results: dict[str, Any]) -> tuple[str, str]:
    from layerline.engines.swarm.docker import DockerCli
    from layerline.engines.swarm.testbase import ensure_test_images
    from layerline.testbed import docker_host, load_image

    manager = DockerCli(docker_host(state, DEVICES[0]))
    say("building the worker and gateway images on n1's dockerd")
    with TestbedLoadMeter(state) as meter:
        t0 = time.monotonic()
        worker, gateway = ensure_test_images(manager)
        built = time.monotonic() - t0
    results["phases"]["images built on n1"] = {"s": built, "load": meter.result, "loadavg": loadavg()}
    from layerline.engines.swarm.testbase import BASE_TAG

    results["images"] = {
        tag: image_size(manager, tag)
        for tag in (BASE_TAG, worker, gateway)
        if manager.run(["image", "ls", "-q", tag])
    }
    say(f"images built in {built:.1f} s; copying them to n2, n3")
    with TestbedLoadMeter(state) as meter:
        t0 = time.monotonic()
        for tag in (worker, gateway):
            load_image(state, tag, source_docker_host=docker_host(state, DEVICES[0]))
        copied = time.monotonic() - t0
    results["phases"]["images copied to n2, n3"] = {"s": copied, "load": meter.result, "loadavg": loadavg()}
    return worker, gateway


def deploy_both(
    state: Any, plan_path: Path, images: tuple[str, str], results: dict[str, Any], stack: list
) -> dict[str, Any]:
    """Deploy with the swarm engine, then the local engine; ``stack`` gets each one's ``down``."""
    from layerline.engines.swarm import SwarmEngine
    from layerline.profile.testbed_devices import testbed_cluster
    from layerline.testbed import docker_host

    target = resolve_target(plan_path, None)
    deployed: dict[str, Any] = {}

    swarm = SwarmEngine(docker_host=docker_host(state, DEVICES[0]), image=images[0], gateway_image=images[1])
    name = f"bsw-{os.getpid()}"
    marks: list[tuple[float, str]] = []
    settings = DeploySettings(
        name=name, port=SWARM_PORT, ready_timeout_s=300.0, request_timeout_s=TIMEOUT_S, threads=None
    )
    say("swarm: deploying")
    with TestbedLoadMeter(state) as meter:
        t0 = time.monotonic()
        dep = swarm.deploy(target, settings, progress=lambda m: marks.append((time.monotonic() - t0, m)))
        took = time.monotonic() - t0
    stack.append(lambda: swarm.down(name))
    results["phases"]["swarm deploy"] = {"s": took, "load": meter.result, "loadavg": loadavg()}
    deployed["swarm"] = {"url": dep.url, "name": name, "deploy_s": took, "progress": marks}
    say(f"swarm: ready in {took:.1f} s at {dep.url}")

    local = LocalEngine()
    lname = f"blo-{os.getpid()}"
    settings = DeploySettings(
        name=lname, port=LOCAL_PORT, ready_timeout_s=300.0, request_timeout_s=TIMEOUT_S, threads=None
    )
    say("local: deploying")
    with TestbedLoadMeter(state) as meter:
        t0 = time.monotonic()
        ldep = local.deploy(target, settings, cluster=testbed_cluster(state))
        took = time.monotonic() - t0
    stack.append(lambda: local.down(lname))
    results["phases"]["local deploy"] = {"s": took, "load": meter.result, "loadavg": loadavg()}
    deployed["local"] = {
        "url": ldep.url,
        "name": lname,
        "deploy_s": took,
        "threads": [s.get("threads") for s in ldep.stages],
    }
    say(f"local: ready in {took:.1f} s at {ldep.url}")
    return deployed


def measure(state: Any, deployed: dict[str, Any], args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Alternate requests between the two deployments; per engine the latencies and stage compute means."""
    inputs = EXAMPLES[args.model].sample_inputs(args.batch, np.random.default_rng(0))
    clients = {k: GatewayClient(v["url"], timeout_s=TIMEOUT_S) for k, v in deployed.items()}
    outputs = {}
    for engine, client in clients.items():
        for i in range(args.warmup):
            got = client.infer(inputs)
            if i == 0:
                outputs[engine] = got
    diff = max(
        float(np.max(np.abs(outputs["swarm"][k].astype(np.float64) - outputs["local"][k])))
        for k in outputs["local"]
    )
    results["max_abs_diff_swarm_vs_local"] = diff
    times: dict[str, list[float]] = {k: [] for k in clients}
    before = {k: metric_sums(c.metrics()) for k, c in clients.items()}
    until = time.monotonic() + args.max_measure_s
    say(f"measuring: {args.requests} requests per engine, alternating")
    with TestbedLoadMeter(state) as meter:
        for i in range(args.requests):
            if time.monotonic() > until:
                say(f"stopped after {i} rounds (--max-measure-s)")
                break
            order = ["local", "swarm"] if i % 2 == 0 else ["swarm", "local"]
            for engine in order:
                t0 = time.perf_counter()
                clients[engine].infer(inputs)
                times[engine].append(time.perf_counter() - t0)
    after = {k: metric_sums(c.metrics()) for k, c in clients.items()}
    results["phases"]["requests (both engines)"] = {
        "s": meter.result["wall_s"],
        "load": meter.result,
        "loadavg": loadavg(),
    }
    for engine in clients:
        stages = len(results["stages"])
        deployed[engine]["latency"] = summarize(times[engine])
        deployed[engine]["latency_raw_s"] = times[engine]
        deployed[engine]["stage_compute_mean_s"] = [
            metric_mean(before[engine], after[engine], "layerline_stage_compute_seconds", str(i))
            for i in range(stages)
        ]
        deployed[engine]["gateway_request_mean_s"] = metric_mean(
            before[engine], after[engine], "layerline_request_seconds", ""
        )


def report(results: dict[str, Any]) -> None:
    ph = results["phases"]

    def others(key: str) -> str:
        load = ph.get(key, {}).get("load")
        return "-" if not load else f"{load['others']:.2f}"

    rows = []
    if "testbed up" in ph:
        rows.append(["testbed up (3 swarm devices)", f"{ph['testbed up']['s']:.1f}", "-",
                     f"waited {ph['testbed up']['waited_s']:.0f} s for the subnet"])  # fmt: skip
    for key in ("images built on n1", "images copied to n2, n3"):
        if key in ph:
            rows.append([key, f"{ph[key]['s']:.1f}", others(key), ""])
    if "testbed down" in ph:
        rows.append(
            [
                "testbed down (containers, daemons, namespaces, data)",
                f"{ph['testbed down']['s']:.1f}",
                "-",
                "",
            ]
        )
        if "testbed up" in ph:
            total = ph["testbed up"]["s"] + ph["testbed down"]["s"]
            rows.append(
                [
                    "testbed up + down",
                    f"{total:.1f}",
                    "-",
                    "target < 60 s: " + ("met" if total < 60 else "MISSED"),
                ]
            )
    for tag, size in results.get("images", {}).items():
        rows.append([f"image {tag}", "", "", f"{size / 1e6:.0f} MB"])
    print_table("testbed and images", ["phase", "s", "other procs (cores)", "note"], rows)

    dep = results.get("deployments", {})
    if not dep or "latency" not in dep.get("local", {}):
        return
    base = dep["local"]
    rows = []
    for engine in ("local", "swarm"):
        d = dep[engine]
        lat = d["latency"]
        rows.append(
            [
                engine + (" (baseline)" if engine == "local" else ""),
                f"{d['deploy_s']:.1f}",
                lat["n"],
                ms(lat["median"]),
                ms(lat["p90"]),
                ms(lat["min"]),
                f"{d['deploy_s'] / base['deploy_s']:.2f}",
                f"{lat['median'] / base['latency']['median']:.3f}",
                f"{lat['p90'] / base['latency']['p90']:.3f}",
            ]
        )
    print_table(
        f"{results['model']} batch {results['batch']}, 3 stages on n1/n2/n3, requests from this host "
        f"(alternating)",
        [
            "engine",
            "deploy s",
            "n",
            "median ms",
            "p90 ms",
            "min ms",
            "deploy ×local",
            "median ×local",
            "p90 ×local",
        ],
        rows,
    )
    rows = []
    for i, st in enumerate(results["stages"]):
        lo, sw = base["stage_compute_mean_s"][i], dep["swarm"]["stage_compute_mean_s"][i]
        rows.append(
            [
                f"stage {i}: blocks {st['blocks'][0]}-{st['blocks'][1] - 1} @{st['device']}",
                f"{st['weight_bytes'] / MIB:.1f}",
                ms(lo),
                ms(sw),
                "-" if not lo or sw is None else f"{sw / lo:.3f}",
            ]
        )
    rows.append(
        [
            "gateway request mean",
            "",
            ms(base["gateway_request_mean_s"]),
            ms(dep["swarm"]["gateway_request_mean_s"]),
            "",
        ]
    )
    print_table(
        "per stage: the workers' own mean compute (gateway /metrics)",
        ["stage", "weights MiB", "local ms", "swarm ms", "swarm/local"],
        rows,
    )
    marks = dep["swarm"].get("progress", [])
    if marks:
        rows = [[m, f"{t:.1f}"] for t, m in marks] + [["ready", f"{dep['swarm']['deploy_s']:.1f}"]]
        print_table("swarm deploy: when each step started (s after the call)", ["step", "s"], rows)
    rows = []
    for key, v in ph.items():
        if v.get("load"):
            load = v["load"]
            avg = " ".join(f"{x:.2f}" for x in v["loadavg"])
            rows.append(
                [
                    key,
                    f"{v['s']:.1f}",
                    f"{load['ours']:.2f}",
                    f"{load['others']:.2f}",
                    f"{load['steal']:.2f}",
                    avg,
                ]
            )
    print_table(
        "machine load per phase (cores; 'ours' = the testbed + this process)",
        ["phase", "s", "ours", "others", "steal", "loadavg 1/5/15 m at end"],
        rows,
    )
    print(f"outputs: max |swarm - local| = {results.get('max_abs_diff_swarm_vs_local', float('nan')):.3g}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(EXAMPLES), default="vgg16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--requests", type=int, default=50, help="timed requests per engine")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per engine first")
    p.add_argument("--max-measure-s", type=float, default=300.0, help="time limit of the timed requests")
    p.add_argument("--cpu", default=DEFAULT_CPU, help="cores of n1,n2,n3")
    p.add_argument("--memory", default=DEFAULT_MEMORY, help="memory of n1,n2,n3")
    p.add_argument("--rate", default="200mbit", help="every device's link bandwidth")
    p.add_argument("--delay", default="2ms", help="every device's receive delay (round trip: twice)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/layerline-bench-swarm"))
    p.add_argument("--wait-testbed-s", type=float, default=600.0, help="wait for another testbed to go")
    p.add_argument("--keep", action="store_true", help="leave the testbed up (deployments are removed)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.cpu = [float(c) for c in args.cpu.split(",")]
    args.memory = args.memory.split(",")
    if len(args.cpu) != 3 or len(args.memory) != 3:
        p.error("--cpu and --memory take three comma-separated values (n1,n2,n3)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from layerline.testbed import FleetSpec, down
    from layerline.testbed.host import missing_docker, missing_requirements

    args = parse_args(argv)
    missing = missing_requirements() + missing_docker()
    if missing:
        raise SystemExit("; ".join(missing))
    args.workdir.mkdir(parents=True, exist_ok=True)
    sliced = cached_sliced_example(args.model, args.workdir, say)[1]
    plan_path, stages = write_plan(sliced, args.model, args.workdir)
    check_memory(stages, args.memory, args.model)
    spec = fleet(args)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "model": args.model,
        "batch": args.batch,
        "fleet": spec,
        "stages": stages,
        "phases": {},
        "loadavg_start": loadavg(),
    }
    home = Path(tempfile.mkdtemp(prefix="bench-swarm-home-"))
    os.environ["LAYERLINE_HOME"] = str(home)  # the testbed, both deployments' directories
    sigterm_as_interrupt()
    say(f"bringing up the testbed (home {home})")
    state, waited, up_s = up_testbed_when_free(FleetSpec.from_yaml_data(spec), home, say, args.wait_testbed_s)
    results["phases"]["testbed up"] = {"s": up_s, "waited_s": waited}
    results["testbed_id"] = state.testbed_id
    say(f"testbed {state.testbed_id} up in {up_s:.1f} s")
    cleanup: list = []
    failed: BaseException | None = None
    try:
        images = build_images(state, results)
        results["deployments"] = deploy_both(state, plan_path, images, results, cleanup)
        measure(state, results["deployments"], args, results)
    except BaseException as exc:
        failed = exc
        say(f"stopped: {type(exc).__name__}: {exc}; taking everything down, then the measured part")
    finally:
        with interrupts_deferred():
            for stop in reversed(cleanup):
                try:
                    stop()
                except Exception as exc:  # the testbed's down removes what is left
                    say(f"taking a deployment down failed: {exc}")
            if args.keep:
                say(f"testbed kept: LAYERLINE_HOME={home} layerline testbed down")
            else:
                t0 = time.monotonic()
                down(home)
                results["phases"]["testbed down"] = {"s": time.monotonic() - t0}
                say(f"testbed down in {results['phases']['testbed down']['s']:.1f} s")
                shutil.rmtree(home, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failed is not None:
        raise failed
    return results


if __name__ == "__main__":
    main()
