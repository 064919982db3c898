"""A stage container's first step: download its stage files from the artifact service, check, then run.

``python -m layerline.engines.swarm.fetch --url http://MANAGER:PORT --root DIR --file stages/stage1.json
--file stages/stage1.onnx -- python3 -m layerline.runtime.worker --config DIR/stages/stage1.json``

Each file is written to ``DIR/<name>`` (the same absolute path as on the manager, so the worker config is used
unchanged), its size and sha256 checked against the served manifest, then this process ``exec``s the command.
Files already there with the right checksum (a restarted container) are not downloaded again. The service may
still be starting, or a node may be briefly cut off: each request is retried with back-off for
``--timeout`` seconds; then it exits 1 with the reason (swarm restarts it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from layerline.engines.swarm.artifacts import CHUNK, MANIFEST, load_manifest
from layerline.errors import EngineError, FormatError

__all__ = ["fetch_files", "main"]

log = logging.getLogger(__name__)


def _get(url: str, deadline: float) -> Any:
    delay = 0.2
    while True:
        try:
            return urllib.request.urlopen(url, timeout=30)
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                raise EngineError(
                    f"{url}: not served (404); the deployment's artifact list lacks it"
                ) from None
            if time.monotonic() + delay > deadline:
                raise EngineError(f"cannot reach the artifact service at {url}: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 3.0)


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest() == entry["sha256"]


def fetch_files(url: str, root: Path, names: list[str], timeout_s: float = 120.0) -> dict[str, float]:
    """Download ``names`` (manifest paths) from ``url`` into ``root``; returns seconds per downloaded file."""
    deadline = time.monotonic() + timeout_s
    with _get(f"{url}/{MANIFEST}", deadline) as resp:
        files = load_manifest(json.loads(resp.read()), f"{url}/{MANIFEST}")
    took = {}
    for name in names:
        entry = files.get(name)
        if entry is None:
            raise EngineError(f"{name!r} is not in the artifact list of {url}; deploy again")
        dest = root / name
        if _matches(dest, entry):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        t0 = time.monotonic()
        digest = hashlib.sha256()
        size = 0
        with _get(f"{url}/files/{name}", deadline) as resp, open(partial, "wb") as out:
            while block := resp.read(CHUNK):
                digest.update(block)
                out.write(block)
                size += len(block)
        if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
            partial.unlink(missing_ok=True)
            raise EngineError(
                f"{name} from {url} arrived damaged ({size} bytes, sha256 {digest.hexdigest()[:12]}; "
                f"expected {entry['size']} bytes, {entry['sha256'][:12]})"
            )
        partial.replace(dest)
        took[name] = time.monotonic() - t0
        log.info("fetched %s (%d bytes) in %.2f s", name, size, took[name])
    return took


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description="fetch a stage's files, then run the worker")
    parser.add_argument("--url", required=True, help="the artifact service, http://HOST:PORT")
    parser.add_argument("--root", type=Path, required=True, help="where the files go (the deployment dir)")
    parser.add_argument("--file", action="append", default=[], help="a manifest path to fetch (repeat)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to keep retrying (120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fetch %(message)s", stream=sys.stderr)
    try:
        fetch_files(args.url.rstrip("/"), args.root, args.file, args.timeout)
    except (EngineError, FormatError, OSError) as exc:
        print(f"fetch: {exc}", file=sys.stderr)
        return 1
    if not command:
        return 0
    sys.stderr.flush()
    os.execvp(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
