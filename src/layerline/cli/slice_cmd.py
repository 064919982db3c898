"""``layerline slice``: cut a model into blocks."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from layerline.cli.output import console, human_bytes, print_json

__all__ = ["print_manifest", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slice",
        help="cut an ONNX or Keras model into blocks",
        description="Cut a model into blocks at points where few tensors are live, and write a sliced "
        "model directory (manifest.json + one .onnx per block).",
        epilog="examples:\n  layerline slice vgg16.onnx -o vgg16.sliced\n"
        "  layerline slice model.keras -o model.sliced --max-live-tensors 2\n"
        "  layerline slice big.onnx -o big.sliced --granularity op --max-blocks 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, help="a .onnx, .keras or .h5 file")
    p.add_argument("-o", "--output", type=Path, help="output directory (default MODEL.sliced)")
    p.add_argument("--max-live-tensors", type=int, default=4, help="most tensors that may cross a cut (4)")
    p.add_argument("--granularity", choices=("layer", "op"), default="layer", help="block size (layer)")
    p.add_argument("--max-blocks", type=int, help="merge into at most this many blocks")
    p.add_argument("--name", help="model name (default: the file stem)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier slice in the output dir")
    p.add_argument(
        "--copy-external-data",
        action="store_true",
        help="copy a model's external weight file instead of hard-linking it (see docs/manifest.md)",
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerline.graph import slice_model
    from layerline.importers import load_model

    model = args.model
    source = model if model.suffix.lower() == ".onnx" else load_model(model)
    out = args.output or model.with_suffix(".sliced")
    with console.status(f"slicing {model} ..."):
        manifest = slice_model(
            source,
            out,
            max_live_tensors=args.max_live_tensors,
            granularity=args.granularity,
            max_blocks=args.max_blocks,
            name=args.name or model.stem,
            overwrite=args.overwrite,
            copy_external_data=args.copy_external_data,
        )
    if args.json:
        print_json(manifest.to_json())
    else:
        print_manifest(manifest, title=f"{manifest.model_name}: {len(manifest.blocks)} blocks → {out}")
    return 0


def human_flops(flops: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def print_manifest(manifest, title: str) -> None:
    """Print one row per block: ops, weights, FLOPs, and the bytes leaving it at batch 1."""
    table = Table(title=title)
    table.add_column("block", justify="right")
    table.add_column("ops", no_wrap=True, overflow="ellipsis", max_width=32)
    for col in ("weights", "FLOPs (est.)", "live out", "bytes out (batch 1)"):
        table.add_column(col, justify="right")
    for i, block in enumerate(manifest.blocks):
        boundary = manifest.boundaries[i + 1]
        ops = " ".join(f"{k}×{v}" if v > 1 else k for k, v in block.op_counts.items())
        table.add_row(
            str(i),
            ops,
            human_bytes(block.weight_bytes),
            human_flops(block.flops),
            str(len(boundary.tensors)),
            human_bytes(boundary.total_bytes_batch1),
        )
    console.print(table)
