"""End-to-end latency, streaming throughput and worker memory of a stage chain vs the monolithic model.

Run: ``python bench/bench_pipeline.py [--model vgg16] [--stages 3] [--requests 30] [--json out.json]``
(``--quick`` for a smoke run on ``vgg16-tiny``). Every number is measured in this run, baselines included:

1. Latency at batch 1, requests one at a time, through the runtime alone (``DirectPipeline`` talking to a
   chain of worker processes) and through the HTTP gateway of a ``LocalEngine`` deployment. Each pipeline
   request is paired with one monolithic onnxruntime run (same thread count) right before it, so slow
   drifts of the machine hit both sides alike. Target: median <= 1.15 x monolithic.
2. Streaming throughput: M requests with up to ``--in-flight`` outstanding, on both paths, against the
   bound min(1 / slowest stage, cores / sum of stage times), stage times measured by running each stage's
   merged ONNX graph alone in this process. Target: >= 0.9 x the bound.
3. Memory: each stage worker's VmRSS after the runs against weights + 2 x largest boundary + 150 MiB.

Each phase is bounded by a count and by ``--max-phase-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    MIB,
    LoadMeter,
    cached_sliced_example,
    cores,
    cpu_seconds,
    machine_info,
    print_table,
    read_memory,
    summarize,
    wait_idle,
)

from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.processes import free_port
from layerline.engines.stages import DeployTarget, resolve_target
from layerline.examples import EXAMPLES
from layerline.graph import Manifest, stage_forward_names, write_stage_model
from layerline.runtime.inprocess import run_stage
from layerline.runtime.launch import start_local_chain
from layerline.runtime.pipeline import DirectPipeline
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec
from layerline.serve.client import GatewayClient

LATENCY_TARGET = 1.15
THROUGHPUT_TARGET = 0.9
MEMORY_SLACK = 150 * MIB
BUSY_CORES = 0.1  # other processes using more than this during a phase make it suspect
TIMEOUT_S = 120.0
_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    """Milliseconds, with two decimals below 10 ms."""
    v = seconds * 1000
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


# -- preparation --------------------------------------------------------------------------------------------


def prepare(model: str, stages: int, workdir: Path) -> tuple[Path, Path, DeployTarget, list[StageSpec]]:
    """Build and slice the example (reused when ``workdir`` already holds them) and write the stage graphs."""
    model_path, sliced = cached_sliced_example(model, workdir, say)
    target = resolve_target(sliced, stages)
    manifest = Manifest.load(sliced)
    stage_dir = workdir / f"{model}-stages{stages}"
    specs = []
    for i, (start, stop) in enumerate(target.ranges):
        path = stage_dir / f"stage{i}.onnx"
        if not path.is_file():
            write_stage_model(sliced, start, stop, path)
        specs.append(StageSpec(i, str(path), stage_forward_names(manifest, start, stop)))
    say(f"{len(specs)} stages over blocks {list(target.ranges)}")
    return model_path, sliced, target, specs


def with_threads(specs: Sequence[StageSpec], threads: int) -> list[StageSpec]:
    return [StageSpec(s.index, s.model_path, s.forward, threads, s.exact) for s in specs]


def timed_run(session: Any, inputs: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = session.run(None, inputs)
    return time.perf_counter() - t0, out


def stage_times(
    specs: Sequence[StageSpec], inputs: dict[str, np.ndarray], reps: int, warmup: int
) -> list[float]:
    """Median compute time of each stage's merged graph run alone (one stage at a time, nothing else busy)."""
    sessions = [open_session(s.model_path, s.threads, s.exact) for s in specs]
    samples: list[list[float]] = [[] for _ in specs]
    for rep in range(warmup + reps):
        tensors = inputs
        for spec, session, times in zip(specs, sessions, samples, strict=True):
            t0 = time.perf_counter()
            tensors = run_stage(session, spec, tensors)
            if rep >= warmup:
                times.append(time.perf_counter() - t0)
    return [summarize(t)["median"] for t in samples]


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    return {role: cpu_seconds(pid) for role, pid in pids.items()}


def cpu_per_request(before: dict, after: dict, count: int) -> dict[str, float]:
    return {
        role: (after[role] - before[role]) / max(count, 1)
        for role in before
        if before[role] is not None and after.get(role) is not None
    }


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -- the two paths ------------------------------------------------------------------------------------------


class Bench:
    """Holds the settings, the monolithic session used for paired runs, and the results."""

    def __init__(self, args: argparse.Namespace, inputs: dict[str, np.ndarray], mono: Any) -> None:
        self.args = args
        self.inputs = inputs
        self.mono = mono
        self.reference = mono.run(None, inputs)[0]
        self.output_name = mono.get_outputs()[0].name
        self.load: dict[str, dict[str, float]] = {}  # phase -> LoadMeter.result

    def deadline(self) -> float:
        return time.monotonic() + self.args.max_phase_s

    def meter(self, phase: str, pids: Sequence[int]) -> LoadMeter:
        """Wait (up to ``--wait-idle``) for an idle machine, then measure its load during ``phase``."""
        if self.args.wait_idle > 0:
            busy = wait_idle(self.args.wait_idle, BUSY_CORES)
            if busy >= BUSY_CORES:
                say(f"{phase}: the machine is still busy ({busy:.2f} cores) after {self.args.wait_idle} s")
        return LoadMeter(pids)

    def _keep(
        self, phase: str, attempt: int, value: Any, load: dict, best: tuple | None
    ) -> tuple[tuple, bool]:
        """Keep the attempt that other processes disturbed least; True when it is good enough to stop."""
        if best is None or load["others"] < best[1]["others"]:
            best = (value, {**load, "attempts": attempt + 1})
        done = load["others"] <= BUSY_CORES or attempt >= self.args.retries
        if not done:
            say(f"{phase}: other processes used {load['others']:.2f} cores; measuring again")
        self.load[phase] = {**best[1], "attempts": attempt + 1}
        return best, done

    def measure(self, phase: str, pids: Sequence[int], run: Callable[[], Any]) -> Any:
        """``run()`` in a metered phase, repeated (``--retries``) while other processes disturb it."""
        best = None
        for attempt in range(1 + self.args.retries):
            with self.meter(phase, pids) as meter:
                value = run()
            best, done = self._keep(phase, attempt, value, meter.result, best)
            if done:
                break
        return best[0]

    async def measure_async(self, phase: str, pids: Sequence[int], run: Callable[[], Any]) -> Any:
        """:meth:`measure` for a coroutine function."""
        best = None
        for attempt in range(1 + self.args.retries):
            with self.meter(phase, pids) as meter:
                value = await run()
            best, done = self._keep(phase, attempt, value, meter.result, best)
            if done:
                break
        return best[0]

    def paired_latency(self, request: Callable[[], tuple[float, Any]], label: str) -> dict[str, Any]:
        """Alternate one monolithic run and one pipeline request: both series of seconds and the extras."""
        for _ in range(self.args.warmup):
            request()
            self.mono.run(None, self.inputs)
        mono, pipe, extras = [], [], []
        until = self.deadline()
        for _ in range(self.args.requests):
            if time.monotonic() > until:
                say(f"{label}: stopped after {len(pipe)} requests (--max-phase-s)")
                break
            mono.append(timed_run(self.mono, self.inputs)[0])
            elapsed, extra = request()
            pipe.append(elapsed)
            extras.append(extra)
        return {"mono_s": mono, "pipeline_s": pipe, "extras": extras}

    # -- runtime alone ------------------------------------------------------------------------------------

    async def direct(self, specs: Sequence[StageSpec]) -> dict[str, Any]:
        say("direct: starting the worker chain")
        chain = start_local_chain(specs, timeout_s=TIMEOUT_S)
        pipe = DirectPipeline("127.0.0.1", chain.ports[0], stages=len(specs), result_port=chain.result_port)
        try:
            await pipe.start()
            health = await pipe.wait_ready(60.0)
            if not health.ready:
                raise SystemExit(f"the direct chain did not become ready: {health.detail}")
            first = await pipe.infer(self.inputs, TIMEOUT_S)
            diff = max_diff(first.outputs[self.output_name], self.reference)

            pids = {f"stage{i}": p.pid for i, p in enumerate(chain.processes) if p is not None}
            pids["client"] = os.getpid()
            ours = list(pids.values())
            say("direct: latency")
            latency = await self.measure_async("direct latency", ours, lambda: self._direct_latency(pipe))
            say("direct: streaming")
            stream = await self.measure_async(
                "direct streaming", ours, lambda: self._direct_stream(pipe, pids)
            )
            memory = {f"stage{i}": read_memory(p.pid) for i, p in enumerate(chain.processes) if p is not None}
        finally:
            await pipe.close()
            chain.stop()
        return {"max_abs_diff": diff, "latency": latency, "stream": stream, "memory": memory}

    async def _direct_latency(self, pipe: DirectPipeline) -> dict[str, Any]:
        for _ in range(self.args.warmup):
            await pipe.infer(self.inputs, TIMEOUT_S)
            self.mono.run(None, self.inputs)
        mono, lat, traces = [], [], []
        until = self.deadline()
        for _ in range(self.args.requests):
            if time.monotonic() > until:
                say(f"direct latency: stopped after {len(lat)} requests (--max-phase-s)")
                break
            mono.append(timed_run(self.mono, self.inputs)[0])  # blocks the loop; nothing else is in flight
            t0 = time.perf_counter()
            result = await pipe.infer(self.inputs, TIMEOUT_S)
            lat.append(time.perf_counter() - t0)
            traces.append(result.stages)
        return {"mono_s": mono, "pipeline_s": lat, "breakdown": breakdown(traces, lat)}

    async def _direct_stream(self, pipe: DirectPipeline, pids: dict[str, int]) -> dict[str, Any]:
        slots = asyncio.Semaphore(self.args.in_flight)
        until = self.deadline()
        latencies: list[float] = []
        traces: list[Any] = []
        ends: list[float] = []

        async def one() -> None:
            async with slots:
                if time.monotonic() > until:
                    return
                t0 = time.perf_counter()
                result = await pipe.infer(self.inputs, TIMEOUT_S)
                ends.append(time.perf_counter())
                latencies.append(ends[-1] - t0)
                traces.append(result.stages)

        before = cpu_snapshot(pids)
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(self.args.stream_requests)))
        after = cpu_snapshot(pids)
        return stream_result(started, ends, latencies, traces, cpu_per_request(before, after, len(ends)))

    # -- through the HTTP gateway -----------------------------------------------------------------------

    def http(self, target: DeployTarget, sliced_name: str) -> dict[str, Any]:
        engine = LocalEngine()
        name = f"bench-{os.getpid()}"
        settings = DeploySettings(
            name=name, port=free_port(), threads=self.args.threads, request_timeout_s=TIMEOUT_S
        )
        say(f"http: deploying {sliced_name} as {name} on port {settings.port}")
        deployed = False
        try:
            state = engine.deploy(target, settings, progress=lambda m: say(f"http: {m}"))
            deployed = True
            client = GatewayClient(state.url, timeout_s=TIMEOUT_S, model=name)
            diff = max_diff(client.infer(self.inputs)[self.output_name], self.reference)

            def request() -> tuple[float, Any]:
                t0 = time.perf_counter()
                client.infer(self.inputs)
                return time.perf_counter() - t0, None

            pids = {p.role: p.pid for p in engine.status(name).processes}
            pids["client"] = os.getpid()
            ours = list(pids.values())
            say("http: latency")
            paired = self.measure("http latency", ours, lambda: self.paired_latency(request, "http latency"))
            latency = {"mono_s": paired["mono_s"], "pipeline_s": paired["pipeline_s"]}
            say("http: streaming")
            stream = self.measure("http streaming", ours, lambda: self._http_stream(client, pids))
            procs = engine.status(name).processes
            memory = {p.role: read_memory(p.pid) for p in procs}
        finally:
            if deployed:
                say(f"http: stopping {name}")
                engine.down(name)
        return {"max_abs_diff": diff, "latency": latency, "stream": stream, "memory": memory}

    def _http_stream(self, client: GatewayClient, pids: dict[str, int]) -> dict[str, Any]:
        until = self.deadline()
        latencies: list[float] = []
        ends: list[float] = []

        def one(_: int) -> None:
            if time.monotonic() > until:
                return
            t0 = time.perf_counter()
            client.infer(self.inputs)
            ends.append(time.perf_counter())
            latencies.append(ends[-1] - t0)

        before = cpu_snapshot(pids)
        started = time.perf_counter()
        with ThreadPoolExecutor(self.args.in_flight) as pool:
            list(pool.map(one, range(self.args.stream_requests)))
        after = cpu_snapshot(pids)
        return stream_result(started, ends, latencies, [], cpu_per_request(before, after, len(ends)))


def breakdown(traces: Sequence[Any], totals: Sequence[float]) -> dict[str, Any]:
    """Mean queue/compute/send per stage from the runtime's traces, and the rest of the end-to-end time."""
    if not traces:
        return {}
    stages = len(traces[0])
    out: dict[str, Any] = {"stages": []}
    accounted = 0.0
    for k in range(stages):
        q = float(np.mean([t[k].queue_s for t in traces]))
        c = float(np.mean([t[k].compute_s for t in traces]))
        s = float(np.mean([t[k].send_s for t in traces]))
        out["stages"].append({"stage": k, "queue_s": q, "compute_s": c, "send_s": s})
        accounted += q + c + s
    out["total_s"] = float(np.mean(totals))
    out["other_s"] = out["total_s"] - accounted
    return out


def stream_result(
    started: float, ends: list[float], latencies: list[float], traces: list[Any], cpu: dict[str, float]
) -> dict[str, Any]:
    done = len(ends)
    wall = (max(ends) - started) if ends else float("nan")
    # Steady state: completions between the k-th and the k-th from last, leaving out pipeline fill and drain.
    order, k = sorted(ends), done // 6
    steady = (done - 1 - 2 * k) / (order[-1 - k] - order[k]) if done >= 6 else float("nan")
    result: dict[str, Any] = {
        "completed": done,
        "wall_s": wall,
        "rps": done / wall if done else 0.0,
        "steady_rps": steady,
        "latency_s": summarize(latencies),
        "cpu_s_per_request": cpu,
    }
    if traces:
        result["compute_s_under_load"] = [
            float(np.mean([t[k].compute_s for t in traces])) for k in range(len(traces[0]))
        ]
    return result


# -- reporting ----------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    st = results["stage_times_s"]
    print_table(
        f"Stage compute time alone ({results['model']}, batch 1, threads={results['threads']})",
        ["stage", "blocks", "median ms"],
        [
            *[
                [f"stage {i}", f"{a}-{b - 1}", ms(t)]
                for i, ((a, b), t) in enumerate(zip(results["ranges"], st, strict=True))
            ],
            ["sum of stages", "", ms(sum(st))],
            ["monolithic", "all", ms(results["mono_alone_s"])],
        ],
    )
    rows = []
    for label, key in (("runtime (DirectPipeline)", "direct"), ("HTTP gateway", "http")):
        if key not in results:
            continue
        lat = results[key]["latency"]
        m, p = summarize(lat["mono_s"]), summarize(lat["pipeline_s"])
        if not p.get("n"):
            continue
        rows.append([f"monolithic (paired with {key})", m["n"], ms(m["median"]), ms(m["p90"]), "", ""])
        rows.append(
            [
                label,
                p["n"],
                ms(p["median"]),
                ms(p["p90"]),
                f"{p['median'] / m['median']:.3f}",
                f"{p['p90'] / m['p90']:.3f}",
            ]
        )
    print_table(
        f"End-to-end latency, batch 1, {len(st)} stages (target: median <= {LATENCY_TARGET} x monolithic)",
        ["path", "n", "median ms", "p90 ms", "x mono (median)", "x mono (p90)"],
        rows,
    )
    if "direct" in results and results["direct"]["latency"].get("breakdown"):
        b = results["direct"]["latency"]["breakdown"]
        rows = [
            [f"stage {s['stage']}", ms(s["queue_s"]), ms(s["compute_s"]), ms(s["send_s"])]
            for s in b["stages"]
        ]
        rows.append(["rest (gateway send, framing, scheduling)", "", "", ms(b["other_s"])])
        rows.append(["end to end (mean)", "", "", ms(b["total_s"])])
        print_table(
            "Where a runtime request's time goes (means over the latency run)",
            ["", "queue ms", "compute ms", "send ms"],
            rows,
        )
    bound = results["bound_rps"]
    rows = []
    for label, key in (("runtime (DirectPipeline)", "direct"), ("HTTP gateway", "http")):
        if key not in results:
            continue
        s = results[key]["stream"]
        left = s.get("bound_cores_left_rps")
        rows.append(
            [
                label,
                s["completed"],
                f"{s['wall_s']:.2f}",
                f"{s['rps']:.2f}",
                f"{bound:.2f}",
                f"{s['rps'] / bound:.3f}",
                f"{s['steady_rps']:.2f} ({s['steady_rps'] / bound:.3f})",
                "" if left is None else f"{left:.2f}",
                ms(s["latency_s"].get("median", float("nan"))),
            ]
        )
    rows.append(["monolithic, one request at a time", "", "", f"{1 / results['mono_alone_s']:.2f}"])
    print_table(
        f"Streaming throughput, up to {results['in_flight']} in flight "
        f"(bound = min(1/slowest stage, {results['cores']} cores/sum of stages); target >= "
        f"{THROUGHPUT_TARGET} x bound)",
        [
            "path",
            "done",
            "wall s",
            "req/s",
            "bound req/s",
            "x bound",
            "steady req/s (x bound)",
            "bound, cores left",
            "median latency ms",
        ],
        rows,
    )
    roles = sorted(
        {r for k in ("direct", "http") if k in results for r in results[k]["stream"]["cpu_s_per_request"]}
    )
    rows = []
    for key in ("direct", "http"):
        if key in results:
            cpu = results[key]["stream"]["cpu_s_per_request"]
            rows.append([key, *[ms(cpu[r]) if r in cpu else "" for r in roles], ms(sum(cpu.values()))])
    alone = {f"stage{i}": t for i, t in enumerate(st)}
    rows.append(["stage graphs alone", *[ms(alone[r]) if r in alone else "" for r in roles], ms(sum(st))])
    print_table("CPU time per request while streaming, by process (ms)", ["path", *roles, "total"], rows)
    if "http" in results:
        rows = []
        for role, budget in results["memory_budget_bytes"].items():
            mem = results["http"]["memory"].get(role)
            rss = mem["rss"] if mem else None
            rows.append(
                [
                    role,
                    f"{results['stage_weight_bytes'][role] / MIB:.1f}",
                    f"{budget / MIB:.1f}",
                    "gone" if rss is None else f"{rss / MIB:.1f}",
                    "" if mem is None else f"{mem['hwm'] / MIB:.1f}",
                    "" if rss is None else f"{rss / budget:.2f}",
                ]
            )
        gw = results["http"]["memory"].get("gateway")
        if gw:
            rows.append(["gateway", "", "", f"{gw['rss'] / MIB:.1f}", f"{gw['hwm'] / MIB:.1f}", ""])
        print_table(
            "Worker memory after the runs (MiB; budget = weights + 2 x largest boundary + 150 MiB)",
            ["process", "weights", "budget", "VmRSS", "VmHWM", "x budget"],
            rows,
        )


def report_load(results: dict[str, Any]) -> None:
    rows = [
        [
            phase,
            m.get("attempts", 1),
            f"{m['wall_s']:.1f}",
            f"{m['ours']:.2f}",
            f"{m['others']:.2f}",
            f"{m['steal']:.2f}",
        ]
        for phase, m in results["load"].items()
    ]
    print_table(
        f"Machine load during each phase (average cores busy, of {results['cores']}; the kept attempt)",
        ["phase", "attempts", "wall s", "this benchmark", "other processes", "steal"],
        rows,
    )
    busy = [p for p, m in results["load"].items() if m["others"] > BUSY_CORES]
    if busy:
        print(
            f"WARNING: other processes used > {BUSY_CORES} core during {', '.join(busy)}; "
            "rerun on an idle machine"
        )


def targets(results: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("direct", "http"):
        if key not in results:
            continue
        lat = results[key]["latency"]
        if lat["pipeline_s"]:
            r = summarize(lat["pipeline_s"])["median"] / summarize(lat["mono_s"])["median"]
            verdict = "met" if r <= LATENCY_TARGET else "MISSED"
            lines.append(f"latency {key}: {r:.3f} x monolithic (target <= {LATENCY_TARGET}): {verdict}")
        r = results[key]["stream"]["rps"] / results["bound_rps"]
        verdict = "met" if r >= THROUGHPUT_TARGET else "MISSED"
        lines.append(f"throughput {key}: {r:.3f} x bound (target >= {THROUGHPUT_TARGET}): {verdict}")
    if "http" in results:
        for role, budget in results["memory_budget_bytes"].items():
            mem = results["http"]["memory"].get(role)
            if mem:
                verdict = "met" if mem["rss"] <= budget else "MISSED"
                lines.append(f"memory {role}: {mem['rss'] / budget:.2f} x budget: {verdict}")
    return lines


# -- main ---------------------------------------------------------------------------------------------------


def memory_budgets(
    sliced: Path, target: DeployTarget
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    manifest = Manifest.load(sliced)
    weights, boundary, budget = {}, {}, {}
    for i, (a, b) in enumerate(target.ranges):
        role = f"stage{i}"
        weights[role] = sum(blk.weight_bytes for blk in manifest.blocks[a:b])
        boundary[role] = max(
            manifest.boundaries[a].bytes_batch1 or 0, manifest.boundaries[b].bytes_batch1 or 0
        )
        budget[role] = weights[role] + 2 * boundary[role] + MEMORY_SLACK
    return weights, boundary, budget


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", choices=sorted(EXAMPLES), help="example model (default vgg16; vgg16-tiny with --quick)"
    )
    p.add_argument("--stages", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=1, help="onnxruntime threads per stage and for the baseline"
    )
    p.add_argument("--requests", type=int, help="timed latency requests per path (default 30, --quick 5)")
    p.add_argument("--stream-requests", type=int, help="requests per streaming run (default 60, --quick 16)")
    p.add_argument("--in-flight", type=int, default=8, help="most requests outstanding while streaming")
    p.add_argument(
        "--warmup", type=int, help="untimed requests before each latency run (default 3, --quick 1)"
    )
    p.add_argument("--max-phase-s", type=float, default=180.0, help="time limit of each measured phase")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=30.0,
        help="before each phase, wait up to this many seconds for other processes to leave the cores (0: no)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a phase again (at most this many times) when other processes used the cores during it",
    )
    p.add_argument("--paths", default="direct,http", help="comma-separated: direct, http")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the built model and stage graphs here")
    p.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke run: vgg16-tiny and few requests")
    args = p.parse_args(argv)
    args.model = args.model or ("vgg16-tiny" if args.quick else "vgg16")
    args.requests = args.requests or (5 if args.quick else 30)
    args.stream_requests = args.stream_requests or (16 if args.quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if unknown := set(args.paths) - {"direct", "http"}:
        p.error(f"unknown --paths {sorted(unknown)}; choose from direct, http")
    if args.stages < 1 or args.in_flight < 1 or args.requests < 1:
        p.error("--stages, --in-flight and --requests must be >= 1")
    return args


def _stop_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: workers and deployments are stopped


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # A background job starts with SIGINT ignored; stop cleanly on SIGTERM and SIGINT alike.
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="layerline-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model_path, sliced, target, specs = prepare(args.model, args.stages, workdir)
        specs = with_threads(specs, args.threads)
        inputs = EXAMPLES[args.model].sample_inputs(1, np.random.default_rng(0))
        mono = open_session(model_path, args.threads)
        bench = Bench(args, inputs, mono)
        say("timing the monolithic model and each stage alone")
        reps = max(5, min(args.requests, 10))
        for _ in range(args.warmup):
            mono.run(None, inputs)
        mono_alone, st = bench.measure(
            "stages alone",
            [os.getpid()],
            lambda: (
                summarize([timed_run(mono, inputs)[0] for _ in range(reps)])["median"],
                stage_times(specs, inputs, reps, args.warmup),
            ),
        )
        n = cores()
        bound = min(1.0 / max(st), n / sum(st))
        weights, boundary, budget = memory_budgets(sliced, target)
        results: dict[str, Any] = {
            "machine": machine_info(),
            "model": args.model,
            "stages": len(specs),
            "threads": args.threads,
            "in_flight": args.in_flight,
            "ranges": [list(r) for r in target.ranges],
            "cores": n,
            "mono_alone_s": mono_alone,
            "stage_times_s": st,
            "bound_rps": bound,
            "stage_weight_bytes": weights,
            "stage_boundary_bytes": boundary,
            "memory_budget_bytes": budget,
        }
        if "direct" in args.paths:
            results["direct"] = asyncio.run(bench.direct(specs))
        if "http" in args.paths:
            results["http"] = bench.http(target, sliced.name)
        results["load"] = bench.load
        for key in ("direct", "http"):
            if key in results:  # the bound again, on the cores other processes left during the run
                left = max(n - bench.load[f"{key} streaming"]["others"], 1e-9)
                results[key]["stream"]["bound_cores_left_rps"] = min(1.0 / max(st), left / sum(st))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    report_load(results)
    print()
    for key in ("direct", "http"):
        if key in results:
            print(f"max |pipeline - monolithic| on the {key} path: {results[key]['max_abs_diff']:.3g}")
    results["targets"] = targets(results)
    if results["mono_alone_s"] < 0.02:
        print(
            f"note: the model runs in {ms(results['mono_alone_s'])} ms, so per-request transport costs "
            "dominate; the targets are meant for real-size models"
        )
    for line in results["targets"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
