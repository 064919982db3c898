"""``layerline quickstart``: the whole workflow on an example, checked against the monolithic model."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from rich.table import Table

from layerline.cli.output import console, human_bytes, human_seconds, print_json
from layerline.cli.slice_cmd import human_flops

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="build an example, slice, deploy, predict and compare with the monolithic model",
        epilog="examples:\n  layerline quickstart\n  layerline quickstart --model resnet18 --stages 2\n"
        "  layerline quickstart --keep      (leave the deployment running)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="vgg16", help="built-in example to use (vgg16)")
    p.add_argument("--stages", type=int, default=3, help="number of stages (3)")
    p.add_argument("--port", type=int, default=8765, help="gateway port (8765)")
    p.add_argument("--requests", type=int, default=20, help="requests to time (20)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per stage and baseline (1)")
    p.add_argument("--exact", action="store_true", help="bit-exact mode (no graph optimisations)")
    p.add_argument("--workdir", type=Path, help="keep the model files here (default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="leave the deployment running afterwards")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    p.set_defaults(func=run)


def _median_latency(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="layerline-quickstart-") as tmp:
            return _run(args, Path(tmp))
    args.workdir.mkdir(parents=True, exist_ok=True)
    return _run(args, args.workdir)


def _run(args: argparse.Namespace, workdir: Path) -> int:
    from layerline.engines.local import DeploySettings, LocalEngine
    from layerline.engines.stages import resolve_target
    from layerline.examples import EXAMPLES, build_example
    from layerline.graph import slice_model
    from layerline.runtime.session import open_session
    from layerline.serve.client import GatewayClient

    quiet = args.json
    say = (lambda *a: None) if quiet else console.print
    name = f"quickstart-{args.model}"
    model_path = workdir / f"{args.model}.onnx"
    with console.status(f"1/5 building example {args.model} ...") if not quiet else nullcontext():
        build_example(args.model, model_path)
    say(f"1/5 built {model_path.name} ({human_bytes(model_path.stat().st_size)})")
    with console.status("2/5 slicing ...") if not quiet else nullcontext():
        manifest = slice_model(model_path, workdir / f"{args.model}.sliced", name=name, overwrite=True)
    say(f"2/5 sliced into {len(manifest.blocks)} blocks")
    target = resolve_target(workdir / f"{args.model}.sliced", args.stages)
    settings = DeploySettings(name=name, port=args.port, threads=args.threads, exact=args.exact)
    engine = LocalEngine()
    with console.status("3/5 deploying ...") if not quiet else nullcontext():
        t0 = time.perf_counter()
        state = engine.deploy(target, settings)
        deploy_s = time.perf_counter() - t0
    say(f"3/5 deployed {len(target.ranges)} stages in {deploy_s:.1f} s at {state.url}")
    try:
        inputs = EXAMPLES[args.model].sample_inputs(1, np.random.default_rng(0))
        client = GatewayClient(state.url, timeout_s=60)
        outputs = client.infer(inputs)
        session = open_session(model_path, args.threads, args.exact)
        expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))
        if args.exact:
            equal = all(np.array_equal(outputs[k], v) for k, v in expected.items())
        else:
            equal = all(np.allclose(outputs[k], v, rtol=1e-5, atol=1e-6) for k, v in expected.items())
        max_diff = max(float(np.max(np.abs(outputs[k] - v))) for k, v in expected.items())
        say("4/5 predicted through the gateway")
        pipeline_s = _median_latency(lambda: client.infer(inputs), args.requests)
        mono_s = _median_latency(lambda: session.run(None, inputs), args.requests)
        say(f"5/5 timed {args.requests} requests each way")
    finally:
        if not args.keep:
            engine.down(name)
    result = {
        "model": args.model,
        "stages": [{"index": i, "blocks": list(r)} for i, r in enumerate(target.ranges)],
        "latency_s": {
            "pipeline_median": pipeline_s,
            "monolithic_median": mono_s,
            "ratio": pipeline_s / mono_s,
        },
        "equals_monolithic": equal,
        "max_abs_diff": max_diff,
        "mode": "exact" if args.exact else "rtol=1e-5 atol=1e-6",
        "kept_running": bool(args.keep),
    }
    if quiet:
        print_json(result)
        return 0 if equal else 1
    table = Table(title=f"{args.model}: {len(manifest.blocks)} blocks in {len(target.ranges)} stages")
    for col in ("stage", "blocks", "weights", "FLOPs (est.)"):
        table.add_column(col, justify="right")
    for i, (start, stop) in enumerate(target.ranges):
        blocks = manifest.blocks[start:stop]
        table.add_row(
            str(i),
            f"{start}–{stop - 1}",
            human_bytes(sum(b.weight_bytes for b in blocks)),
            human_flops(sum(b.flops for b in blocks)),
        )
    console.print(table)
    console.print(
        f"latency (median of {args.requests}, batch 1): pipeline {human_seconds(pipeline_s)}, "
        f"monolithic onnxruntime {human_seconds(mono_s)} (×{pipeline_s / mono_s:.2f})"
    )
    verdict = "[green]yes[/]" if equal else "[red]NO[/]"
    console.print(f"output equals monolithic: {verdict} ({result['mode']}, max |diff| {max_diff:.2e})")
    if args.keep:
        console.print(f"still running at {state.url}; stop with `layerline down --name {name}`")
    return 0 if equal else 1
