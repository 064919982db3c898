"""The ``layerline`` command: one entry point, one module per subcommand.

Exit codes: 0 success, 1 failure (a LayerlineError, printed as ``error: ...``), 2 usage errors (argparse).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from layerline import __version__
from layerline.cli import (
    autoscale_cmd,
    benchmark_cmd,
    configure_cmd,
    deploy_cmd,
    examples_cmd,
    heal_cmd,
    image_cmd,
    predict_cmd,
    quickstart_cmd,
    scale_cmd,
    slice_cmd,
    status_cmd,
    testbed_cmd,
)
from layerline.cli.output import console_err
from layerline.errors import LayerlineError

__all__ = ["build_parser", "main"]

EPILOG = """\
workflow:
  layerline examples vgg16 -o vgg16.onnx          build an example model (random weights, no download)
  layerline slice vgg16.onnx -o vgg16.sliced      cut it into blocks
  layerline deploy vgg16.sliced --stages 3        start 3 stage workers and a gateway on 127.0.0.1:8765
  layerline predict input.npy                     send a request, print top-k / save the output
  layerline status                                what is running, stage by stage
  layerline down                                  stop it

  layerline quickstart                            all of the above on an example, with a correctness check
"""

COMMANDS = (
    quickstart_cmd,
    examples_cmd,
    slice_cmd,
    deploy_cmd,
    predict_cmd,
    status_cmd,
    scale_cmd,
    autoscale_cmd,
    benchmark_cmd,
    configure_cmd,
    testbed_cmd,
    image_cmd,
    heal_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerline",
        description="Cut a trained network into stages, deploy them as a chain of workers, serve them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"layerline {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except LayerlineError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console_err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
