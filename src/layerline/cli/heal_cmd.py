"""``layerline heal``: re-plan a swarm deployment onto the nodes still ready and deploy it again."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerline.cli.output import console, console_err, print_json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heal",
        help="re-plan a swarm deployment without its lost nodes and deploy it again",
        description="Find the devices whose swarm nodes are not ready (taken off the network, drained, "
        "removed), plan again from PROFILE without them (same source device), and replace the deployment "
        "with the new plan under the same name and port. See docs/swarm.md.",
        epilog="examples:\n  layerline heal --name vgg --profile vgg.profile.json\n"
        "  layerline heal --name vgg --profile vgg.profile.json -o vgg.healed.plan.json --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", required=True, help="the deployment to heal")
    p.add_argument("--profile", type=Path, required=True, help="the profile the plan was made from")
    p.add_argument("-o", "--output", type=Path, help="where to write the new plan (default: next to PROFILE)")
    p.add_argument("--batch", type=int, default=1, help="batch size to plan for (1)")
    p.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the new chain (120)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerline.engines.state import load_state
    from layerline.engines.swarm import SwarmEngine
    from layerline.engines.swarm.image import DEFAULT_GATEWAY_IMAGE, DEFAULT_WORKER_IMAGE
    from layerline.engines.swarm.replan import heal

    state = load_state(args.name)
    engine = SwarmEngine(
        docker_host=state.extra.get("docker_host"),
        image=str(state.extra.get("image") or DEFAULT_WORKER_IMAGE),
        gateway_image=str(state.extra.get("gateway_image") or DEFAULT_GATEWAY_IMAGE),
    )
    with console_err.status("healing ...") as spinner:
        result = heal(
            engine,
            args.name,
            args.profile,
            plan_out=args.output,
            batch=args.batch,
            objective=args.objective,
            ready_timeout_s=args.timeout,
            progress=lambda m: spinner.update(m),
        )
    stages = [{"blocks": list(s["blocks"]), "device": s["device"]} for s in result.state.stages]
    if args.json:
        print_json(
            {
                "name": args.name,
                "lost": list(result.lost),
                "plan": str(result.plan_path),
                "url": result.state.url,
                "stages": stages,
                "predicted_latency_s": (result.report["plan"].predicted or {}).get("latency_s"),
                "seconds": result.seconds,
            }
        )
        return 0
    console.print(f"left out {', '.join(result.lost)}; new plan {result.plan_path}")
    for i, s in enumerate(stages):
        console.print(f"  stage {i}: blocks {s['blocks'][0]}-{s['blocks'][1] - 1} on {s['device']}")
    console.print(f"{args.name} serves again at {result.state.url} ({result.seconds:.1f} s)")
    return 0
