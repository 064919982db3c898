"""``layerline image``: build the worker and gateway images and get them onto every swarm node."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from layerline.cli.output import console, console_err, human_bytes, print_json

__all__ = ["register"]

EPILOG = """\
examples:
  layerline image build                                   worker + gateway images FROM python:3.11-slim
  layerline image build --base-image debian-py311:local --wheels ./wheels     offline build
  layerline image save -o layerline-images.tar            for `docker load` on air-gapped nodes
  layerline image load layerline-images.tar --docker-host ssh://pi@node2
  layerline image copy --to unix:///run/node2.sock --to unix:///run/node3.sock
  layerline image push --registry reg.lan:5000
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "image",
        help="build the swarm engine's images and distribute them to nodes",
        description="Build the stage-worker image (onnxruntime + numpy + layerline) and the gateway image "
        "(the worker image + aiohttp + prometheus_client), and get them onto every node: a registry, "
        "a tar file, or daemon to daemon. See docs/swarm.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--docker-host", help="the daemon to build on / copy from (default: DOCKER_HOST)")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION")
    isub.required = True

    b = isub.add_parser("build", help="build the worker and gateway images")
    b.add_argument("--base-image", default=None, help="FROM of the worker image (python:3.11-slim)")
    b.add_argument("--tag", default=None, help="worker image tag (layerline-worker:latest)")
    b.add_argument("--gateway-tag", default=None, help="gateway image tag (layerline-gateway:latest)")
    b.add_argument("--wheels", type=Path, help="a folder of wheels to use instead of downloading them")
    b.add_argument("--no-gateway", action="store_true", help="build the worker image only")
    b.add_argument("--json", action="store_true", help="print one JSON document")
    b.set_defaults(func=run_build)

    s = isub.add_parser("save", help="docker save the images into one tar file")
    s.add_argument("-o", "--output", type=Path, required=True)
    s.add_argument("--tag", action="append", help="image(s) to save (default: worker + gateway)")
    s.set_defaults(func=run_save)

    ld = isub.add_parser("load", help="docker load a tar file into a daemon (--docker-host)")
    ld.add_argument("file", type=Path)
    ld.set_defaults(func=run_load)

    c = isub.add_parser("copy", help="stream the images from this daemon into other daemons")
    c.add_argument("--to", action="append", required=True, metavar="DOCKER_HOST", help="target (repeat)")
    c.add_argument("--tag", action="append", help="image(s) to copy (default: worker + gateway)")
    c.add_argument("--force", action="store_true", help="copy even where the tag exists")
    c.set_defaults(func=run_copy)

    r = isub.add_parser("push", help="tag the images for a registry and push them")
    r.add_argument("--registry", required=True, help="HOST[:PORT][/PATH]")
    r.add_argument("--tag", action="append", help="image(s) to push (default: worker + gateway)")
    r.set_defaults(func=run_push)
    for action in (b, s, ld, c, r):  # also after the action: `layerline image load F --docker-host H`
        action.add_argument("--docker-host", default=argparse.SUPPRESS, help="the daemon to act on")


def _default_tags(tags: list[str] | None) -> list[str]:
    from layerline.engines.swarm.image import DEFAULT_GATEWAY_IMAGE, DEFAULT_WORKER_IMAGE

    return tags or [DEFAULT_WORKER_IMAGE, DEFAULT_GATEWAY_IMAGE]


def _docker(args: argparse.Namespace, host: str | None = None):
    from layerline.engines.swarm.docker import DockerCli

    return DockerCli(host or args.docker_host)


def run_build(args: argparse.Namespace) -> int:
    from layerline.engines.swarm.image import (
        DEFAULT_BASE_IMAGE,
        DEFAULT_GATEWAY_IMAGE,
        DEFAULT_WORKER_IMAGE,
        build_gateway_image,
        build_worker_image,
    )

    docker = _docker(args)
    built = []
    with console_err.status("building the worker image (downloads wheels unless --wheels) ..."):
        built.append(
            build_worker_image(
                args.base_image or DEFAULT_BASE_IMAGE, args.tag or DEFAULT_WORKER_IMAGE, docker, args.wheels
            )
        )
    if not args.no_gateway:
        with console_err.status("building the gateway image ..."):
            built.append(
                build_gateway_image(
                    built[0].tag, args.gateway_tag or DEFAULT_GATEWAY_IMAGE, docker, args.wheels
                )
            )
    if args.json:
        print_json([{"tag": b.tag, "from": b.base_image, "size_bytes": b.size_bytes, "build_s": b.build_s}
                    for b in built])  # fmt: skip
        return 0
    for b in built:
        console.print(f"built {b.tag} FROM {b.base_image}: {human_bytes(b.size_bytes)} in {b.build_s:.0f} s")
    return 0


def run_save(args: argparse.Namespace) -> int:
    from layerline.engines.swarm.distribute import save_image

    tags = _default_tags(args.tag)
    with console_err.status(f"saving {', '.join(tags)} ..."):
        path = save_image(_docker(args), tags, args.output)
    console.print(
        f"wrote {path} ({human_bytes(path.stat().st_size)}); on each node: layerline image load {path}"
    )
    return 0


def run_load(args: argparse.Namespace) -> int:
    from layerline.engines.swarm.distribute import load_image

    with console_err.status(f"loading {args.file} ..."):
        report = load_image(_docker(args), args.file)
    console.print(report or f"loaded {args.file}")
    return 0


def run_copy(args: argparse.Namespace) -> int:
    from layerline.engines.swarm.distribute import copy_image

    source = _docker(args)
    for target in args.to:
        for tag in _default_tags(args.tag):
            t0 = time.monotonic()
            with console_err.status(f"copying {tag} to {target} ..."):
                took = copy_image(source, _docker(args, target), tag, args.force)
            if took is None:
                console.print(f"{target}: {tag} already there")
            else:
                console.print(f"{target}: {tag} copied in {time.monotonic() - t0:.1f} s")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from layerline.engines.swarm.distribute import push_image

    for tag in _default_tags(args.tag):
        with console_err.status(f"pushing {tag} ..."):
            ref = push_image(_docker(args), tag, args.registry)
        console.print(f"pushed {ref}; deploy with --image {ref}")
    return 0
