"""``layerline deploy``: start a sliced model (or a plan) as a chain of stage workers behind a gateway."""

from __future__ import annotations

import argparse
from pathlib import Path

from layerline.cli.autoscale_cmd import add_autoscale_options, autoscale_options_given, config_from_args
from layerline.cli.output import console
from layerline.cli.status_cmd import print_status, print_swarm_status
from layerline.errors import EngineError

__all__ = ["default_name", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="run a sliced model as a chain of stage workers with an HTTP gateway",
        description="Start one worker process per stage and a gateway; returns when every stage is "
        "connected, and leaves them running until `layerline down`.",
        epilog="examples:\n  layerline deploy vgg16.sliced --stages 3\n"
        "  layerline deploy vgg16.plan.json --cluster cluster.yaml\n"
        "  layerline deploy vgg16.plan.json --testbed      # each stage inside its testbed device\n"
        "  layerline deploy vgg16.sliced --stages 2 --port 9000 --name vgg-test --threads 1\n"
        "  layerline deploy vgg16.sliced --stages 3 --transport redis --replicas 1,2,1\n"
        "  layerline deploy vgg16.sliced --stages 3 --transport redis --autoscale --max 4 --down-delay 60",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", type=Path, help="a sliced model directory or a plan file")
    p.add_argument("--stages", type=int, help="split into this many stages balancing compute (default 1)")
    p.add_argument("--name", help="served model name (default: the model's name from the manifest)")
    p.add_argument(
        "--engine",
        choices=("local", "swarm"),
        default="local",
        help="where to run the stages: local processes, or services on this Docker Swarm manager (local)",
    )
    p.add_argument("--image", help="swarm: the stage-worker image (docs/swarm.md; default layerline-worker)")
    p.add_argument("--gateway-image", help="swarm: the gateway image (default layerline-gateway:latest)")
    p.add_argument("--docker-host", help="swarm: the manager's Docker socket (default: docker's own default)")
    p.add_argument("--host", default="127.0.0.1", help="gateway address (127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="gateway port (8765)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        type=Path,
        help="the cluster file the plan was profiled on: run each stage on its device (CPU quotas included)",
    )
    where.add_argument(
        "--testbed",
        action="store_true",
        help="run each stage (and the gateway) inside its device of the running emulated testbed; the "
        "plan's devices must be the testbed's (a plan from `benchmark --testbed`)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="onnxruntime threads per stage (default: a plan's own, else what `layerline benchmark` used "
        "for the stage's device: ceil(cpu_quota), or all cores; 1 for --stages)",
    )
    p.add_argument("--exact", action="store_true", help="no graph optimisations: bit-exact vs monolithic")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness (120)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="deadline per request, s (30)")
    p.add_argument(
        "--transport",
        choices=("tcp", "redis"),
        default="tcp",
        help="connect stages directly (tcp) or through Redis Streams (redis)",
    )
    p.add_argument(
        "--redis-url",
        default="auto",
        help="with --transport redis: redis://HOST:PORT/DB, or auto to start a private redis-server (auto)",
    )
    p.add_argument(
        "--replicas",
        metavar="N[,N...]",
        help="worker processes per stage, one count for all or one per stage (1; other counts need "
        "--transport redis)",
    )
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, MB (64)")
    p.add_argument(
        "--autoscale",
        action="store_true",
        help="with --transport redis: run an autoscaler with the deployment (see `layerline autoscale`)",
    )
    add_autoscale_options(p, title="autoscaling (with --autoscale; per stage: N or N,N,...)")
    p.set_defaults(func=run, deploy_parser=p)


def _replicas_and_autoscale(args: argparse.Namespace, stages: int) -> tuple:
    """``--replicas`` and ``--autoscale`` checked against the transport and engine (usage errors, exit 2)."""
    from layerline.runtime.scaling import parse_replicas

    parser: argparse.ArgumentParser = args.deploy_parser
    try:
        counts = parse_replicas(args.replicas, stages)
    except ValueError as exc:
        parser.error(str(exc))
    given = autoscale_options_given(args)
    if given and not args.autoscale:
        parser.error(f"{', '.join(given)} set(s) the autoscaler: add --autoscale")
    if args.engine == "swarm" and args.autoscale:
        parser.error(
            "--autoscale starts a background process of a local deployment; for a swarm deployment run "
            "`layerline autoscale --name NAME` on the manager (it scales the stage services)"
        )
    if args.transport != "redis":
        if any(n != 1 for n in counts):
            parser.error(
                f"--replicas {args.replicas}: the TCP transport runs exactly one worker per stage (its "
                "upstream connects to one port); add --transport redis for replicas"
            )
        if args.autoscale:
            parser.error("--autoscale scales on the stages' Redis streams: add --transport redis")
    autoscale = None
    if args.autoscale:
        try:
            autoscale = config_from_args(args, stages)
        except ValueError as exc:
            parser.error(str(exc))
        if args.replicas is None:  # start inside the bounds, with at least one replica to probe
            counts = [min(p.max_replicas, max(p.min_replicas, 1)) for p in autoscale.stages]
    return (None if args.replicas is None and not args.autoscale else tuple(counts)), autoscale


def default_name(sliced_dir: Path) -> str:
    from layerline.graph import Manifest

    return Manifest.load(sliced_dir).model_name


def run(args: argparse.Namespace) -> int:
    from layerline.engines.local import DeploySettings, LocalEngine
    from layerline.engines.stages import resolve_target

    target = resolve_target(args.target, args.stages)
    cluster = None
    if args.cluster is not None:
        from layerline.profile.cluster import load_cluster

        cluster = load_cluster(args.cluster)
    elif args.testbed:
        from layerline.profile.testbed_devices import running_testbed, testbed_cluster

        cluster = testbed_cluster(running_testbed())
    from layerline.engines.placement import place

    for warning in place(target, cluster, args.threads).warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    replicas, autoscale = _replicas_and_autoscale(args, len(target.ranges))
    settings = DeploySettings(
        name=args.name or default_name(target.sliced_dir),
        host=args.host,
        port=args.port,
        threads=args.threads,
        exact=args.exact,
        ready_timeout_s=args.timeout,
        request_timeout_s=args.request_timeout,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        transport=args.transport,
        redis_url=args.redis_url,
        replicas=replicas,
        autoscale=autoscale,
        autoscale_metrics_port=args.as_metrics_port or 0,
    )
    if args.engine == "swarm":
        if cluster is not None:
            option = "--testbed" if args.testbed else "--cluster"
            raise EngineError(
                f"{option} places stages on devices of this machine; the swarm engine runs on swarm nodes: "
                f"drop {option} or --engine swarm"
            )
        from layerline.engines.swarm import SwarmEngine

        options = {"image": args.image} if args.image else {}
        if args.gateway_image:
            options["gateway_image"] = args.gateway_image
        swarm = SwarmEngine(docker_host=args.docker_host, **options)
        with console.status("deploying on the swarm ...") as spinner:
            state = swarm.deploy(target, settings, progress=lambda m: spinner.update(m))
        console.print(f"[green]ready[/]: model {state.name!r} served at {state.url}")
        print_swarm_status(swarm.status(state.name))
    else:
        engine = LocalEngine()
        with console.status("deploying ...") as spinner:
            state = engine.deploy(target, settings, progress=lambda m: spinner.update(m), cluster=cluster)
        console.print(f"[green]ready[/]: model {state.name!r} served at {state.url}")
        print_status(engine.status(state.name))
    console.print(
        f"try: layerline predict INPUT.npy --url {state.url}    stop: layerline down --name {state.name}"
    )
    return 0
