"""``layerline examples``: list or build the built-in example models."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from layerline.cli.output import console, human_bytes

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "examples",
        help="list or build built-in example models (random weights, no download)",
        description="Build an example model as an ONNX file. Without a name, list the examples.",
        epilog="examples:\n  layerline examples\n  layerline examples vgg16 -o vgg16.onnx\n"
        "  layerline examples transformer-tiny -o t.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="example to build (omit to list them)")
    p.add_argument("-o", "--output", type=Path, help="where to write the .onnx file (default NAME.onnx)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerline.examples import EXAMPLES, build_example

    if not args.name:
        table = Table(title="built-in examples")
        table.add_column("name")
        table.add_column("description")
        for name, info in EXAMPLES.items():
            table.add_row(name, info.description)
        console.print(table)
        return 0
    out = args.output or Path(f"{args.name}.onnx")
    with console.status(f"building {args.name} ..."):
        path = build_example(args.name, out)
    console.print(f"wrote {path} ({human_bytes(path.stat().st_size)})")
    return 0
