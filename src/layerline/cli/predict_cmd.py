"""``layerline predict``: send an input to a running deployment and show or save the output."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.table import Table

from layerline.cli.output import console, human_seconds
from layerline.errors import BadRequest, EngineError

__all__ = ["register", "resolve_url"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="send an input (.npy, .npz or an image) to a running deployment",
        epilog="examples:\n  layerline predict input.npy\n  layerline predict cat.jpg --top-k 3\n"
        "  layerline predict inputs.npz -o outputs.npz --url http://127.0.0.1:9000\n"
        "  curl --data-binary @input.npy http://127.0.0.1:8765/input -o output.npy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help=".npy (one input), .npz (named inputs) or an image file")
    p.add_argument("--url", help="gateway URL (default: the running deployment's)")
    p.add_argument("--name", help="deployment to use when several run")
    p.add_argument("--top-k", type=int, default=5, help="classes to print for classifier outputs (5)")
    p.add_argument("-o", "--output", type=Path, help="save the output (.npy, or .npz for several)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (60)")
    p.set_defaults(func=run)


def resolve_url(url: str | None, name: str | None) -> str:
    """The gateway URL: given, else the named or only running deployment's, else the default port."""
    from layerline.engines.state import list_deployments, load_state

    if url:
        return url.rstrip("/")
    names = list_deployments()
    if name:
        return load_state(name).url
    if len(names) == 1:
        return load_state(names[0]).url
    if len(names) > 1:
        raise EngineError(f"several deployments run ({', '.join(names)}); pass --name or --url")
    return "http://127.0.0.1:8765"


def _load_inputs(path: Path, client) -> dict[str, np.ndarray]:
    info = client.model_info()
    names = [spec.name for spec in info.inputs]
    suffix = path.suffix.lower()
    if not path.is_file():
        raise BadRequest(f"input file {path} does not exist")
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if len(names) != 1:
            raise BadRequest(
                f"the model takes {len(names)} inputs ({', '.join(names)}); pass an .npz with each"
            )
        return {names[0]: array}
    if suffix in IMAGE_SUFFIXES:
        from layerline.serve.image import load_image

        if len(names) != 1:
            raise BadRequest("an image can only feed a single-input model; pass an .npz with each input")
        return {names[0]: load_image(path, info.inputs[0])}
    raise BadRequest(f"cannot read {path}: use .npy, .npz or an image ({', '.join(sorted(IMAGE_SUFFIXES))})")


def run(args: argparse.Namespace) -> int:
    import time

    from layerline.serve.client import GatewayClient
    from layerline.serve.image import top_k

    url = resolve_url(args.url, args.name)
    client = GatewayClient(url, timeout_s=args.timeout)
    inputs = _load_inputs(args.input, client)
    t0 = time.perf_counter()
    outputs = client.infer(inputs)
    elapsed = time.perf_counter() - t0
    console.print(f"{len(outputs)} output(s) from {url} in {human_seconds(elapsed)}")
    for name, value in outputs.items():
        console.print(f"  {name}: {value.dtype} {list(value.shape)}")
    first = next(iter(outputs.values()))
    if first.ndim == 2 and first.shape[1] > 1 and np.issubdtype(first.dtype, np.floating):
        for row in range(first.shape[0]):
            table = Table(title=f"top-{args.top_k} (sample {row})")
            table.add_column("class", justify="right")
            table.add_column("probability", justify="right")
            for cls, prob in top_k(first[row], args.top_k):
                table.add_row(str(cls), f"{prob:.4f}")
            console.print(table)
    if args.output:
        if args.output.suffix.lower() == ".npz" or len(outputs) > 1:
            out = args.output.with_suffix(".npz")
            np.savez(out, **outputs)
        else:
            out = args.output
            np.save(out, first)
        console.print(f"saved {out}")
    return 0
