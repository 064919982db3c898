"""``layerline predict``: send an input to a running deployment and show or save the output.

With ``--async`` the request is queued on the gateway (``POST /v1/requests``) and its id printed;
``--wait ID``, ``--status ID`` and ``--cancel ID`` follow such a request.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from layerline.cli.output import console, console_err, human_seconds, print_json
from layerline.errors import BadRequest, EngineError

__all__ = ["register", "resolve_url"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="send an input (.npy, .npz or an image) to a running deployment",
        epilog="examples:\n  layerline predict input.npy\n  layerline predict cat.jpg --top-k 3\n"
        "  layerline predict inputs.npz -o outputs.npz --url http://127.0.0.1:9000\n"
        "  ID=$(layerline predict input.npy --async)     queue it, print the id\n"
        "  layerline predict --status $ID --json\n"
        "  layerline predict --wait $ID -o output.npy\n"
        "  layerline predict --cancel $ID\n"
        "  curl --data-binary @input.npy http://127.0.0.1:8765/input -o output.npy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input", type=Path, nargs="?", help=".npy (one input), .npz (named inputs) or an image file"
    )
    p.add_argument("--url", help="gateway URL (default: the running deployment's)")
    p.add_argument("--name", help="deployment to use when several run")
    p.add_argument("--top-k", type=int, default=5, help="classes to print for classifier outputs (5)")
    p.add_argument("-o", "--output", type=Path, help="save the output (.npy, or .npz for several)")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the answer (also for --wait) (60)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    a = p.add_argument_group("asynchronous requests (kept in the gateway's memory)")
    a.add_argument(
        "--async", dest="submit", action="store_true", help="queue INPUT on the gateway and print its id"
    )
    a.add_argument("--wait", metavar="ID", help="wait for a queued request; show its result like predict")
    a.add_argument("--status", metavar="ID", help="show a queued request's status")
    a.add_argument("--cancel", metavar="ID", help="cancel a queued or running request")
    p.set_defaults(func=run, predict_parser=p)


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


def _check_usage(args: argparse.Namespace) -> None:
    """Exactly one of INPUT, --wait, --status, --cancel; argparse's usage error (exit 2) otherwise."""
    parser: argparse.ArgumentParser = args.predict_parser
    ids = [flag for flag in ("wait", "status", "cancel") if getattr(args, flag)]
    if (args.input is not None) + len(ids) != 1:
        parser.error("give an INPUT file, or one of --wait ID, --status ID, --cancel ID")
    if args.submit and args.input is None:
        parser.error("--async needs an INPUT file to queue")
    if args.output and (args.submit or args.status or args.cancel):
        parser.error("-o saves a result: use it with INPUT (without --async) or with --wait ID")


def _show_outputs(outputs: dict[str, np.ndarray], args: argparse.Namespace, extra: dict[str, Any]) -> None:
    from layerline.serve.image import top_k

    saved = None
    first = next(iter(outputs.values()))
    if args.output:
        if args.output.suffix.lower() == ".npz" or len(outputs) > 1:
            saved = args.output.with_suffix(".npz")
            np.savez(saved, **outputs)
        else:
            saved = args.output
            np.save(saved, first)
    classifier = first.ndim == 2 and first.shape[1] > 1 and np.issubdtype(first.dtype, np.floating)
    rows = [top_k(first[row], args.top_k) for row in range(first.shape[0])] if classifier else []
    if args.json:
        print_json(
            {
                **extra,
                "outputs": {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in outputs.items()},
                "top_k": [[{"class": int(c), "probability": float(p)} for c, p in r] for r in rows],
                "saved": str(saved) if saved else None,
            }
        )
        return
    for name, value in outputs.items():
        console.print(f"  {name}: {value.dtype} {list(value.shape)}")
    for row, pairs in enumerate(rows):
        table = Table(title=f"top-{args.top_k} (sample {row})")
        table.add_column("class", justify="right")
        table.add_column("probability", justify="right")
        for cls, prob in pairs:
            table.add_row(str(cls), f"{prob:.4f}")
        console.print(table)
    if saved:
        console.print(f"saved {saved}")


def _print_request(doc: dict[str, Any]) -> None:
    line = f"{doc['id']}  {doc['status']}  created {doc.get('created_at')}"
    if doc.get("finished_at"):
        line += f"  finished {doc['finished_at']}"
    console.print(line)
    if doc.get("error"):
        console.print(f"  {doc['error']}")


def run(args: argparse.Namespace) -> int:
    from layerline.serve.client import GatewayClient

    _check_usage(args)
    url = resolve_url(args.url, args.name)
    client = GatewayClient(url, timeout_s=args.timeout)
    if args.status:
        doc = client.request_status(args.status)
        if args.json:
            print_json(doc)
        else:
            _print_request(doc)
        return 0
    if args.cancel:
        doc = client.cancel(args.cancel)
        if args.json:
            print_json(doc)
        else:
            console.print(f"cancelled {doc['id']}")
        return 0
    if args.wait:
        t0 = time.perf_counter()
        outputs = client.wait(args.wait, timeout_s=args.timeout)
        elapsed = time.perf_counter() - t0
        if not args.json:
            console.print(f"{len(outputs)} output(s) of request {args.wait} from {url}")
        _show_outputs(outputs, args, {"url": url, "id": args.wait, "seconds": elapsed})
        return 0
    inputs = _load_inputs(args.input, client)
    if args.submit:
        doc = client.enqueue(inputs)
        if args.json:
            print_json(doc)
        else:
            console.print(doc["id"], soft_wrap=True)  # alone on stdout: ID=$(layerline predict x.npy --async)
            console_err.print(
                f"queued; follow it with `layerline predict --wait {doc['id']}`", soft_wrap=True
            )
        return 0
    t0 = time.perf_counter()
    outputs = client.infer(inputs)
    elapsed = time.perf_counter() - t0
    if not args.json:
        console.print(f"{len(outputs)} output(s) from {url} in {human_seconds(elapsed)}")
    _show_outputs(outputs, args, {"url": url, "seconds": elapsed})
    return 0
