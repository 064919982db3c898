"""Serving a deployment's files to stage containers on other nodes (stdlib HTTP, read-only, checksummed).

Swarm configs hold at most 500 KB and a stage graph is its weights (hundreds of MB for VGG16), so stage
files travel over HTTP instead: ``deploy`` writes ``artifacts.json`` (every file under ``stages/`` with its
size and sha256) into the deployment directory and runs this server as a swarm service pinned to the node
that has the directory (the manager, where ``layerline deploy`` ran), bind-mounted read-only. Each stage
container first runs :mod:`layerline.engines.swarm.fetch`, which downloads its own files, checks them and
then becomes the worker. Only listed files are served (no directory listing, no paths outside the list).

Run: ``python -m layerline.engines.swarm.artifacts --root DIR --listen HOST:PORT``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from layerline.errors import FormatError

__all__ = ["MANIFEST", "ArtifactServer", "load_manifest", "main", "write_manifest"]

log = logging.getLogger(__name__)

MANIFEST = "artifacts.json"
FORMAT = "layerline.artifacts"
FORMAT_VERSION = 1
CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path, files: Iterable[Path]) -> Path:
    """Write ``root/artifacts.json`` listing ``files`` (paths under ``root``) with size and sha256."""
    entries = {}
    for path in sorted(files):
        rel = path.resolve().relative_to(root.resolve()).as_posix()
        entries[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    out = root / MANIFEST
    out.write_text(
        json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "files": entries}, indent=1)
    )
    return out


def load_manifest(data: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The ``files`` of a manifest document, after checking its format and version."""
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{where} is {data.get('format')!r} version {data.get('format_version')!r}, not {FORMAT!r} "
            f"version {FORMAT_VERSION}; the worker image and the deploying layerline differ: "
            "rebuild the image"
        )
    return dict(data["files"])


class _Handler(BaseHTTPRequestHandler):
    server: ArtifactServer

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path == "/health":
            return self._send(200, b"ok", "text/plain")
        if self.path == f"/{MANIFEST}":
            return self._send(200, self.server.manifest_bytes, "application/json")
        rel = self.path.removeprefix("/files/")
        entry = self.server.files.get(rel) if self.path.startswith("/files/") else None
        if entry is None:
            return self._send(404, f"no artifact {self.path!r}\n".encode(), "text/plain")
        path = self.server.root / rel
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(entry["size"]))
        self.send_header("X-Sha256", entry["sha256"])
        self.end_headers()
        with open(path, "rb") as fh:
            shutil.copyfileobj(fh, self.wfile, CHUNK)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ArtifactServer(ThreadingHTTPServer):
    """Serves the files ``root/artifacts.json`` lists, nothing else."""

    daemon_threads = True

    def __init__(self, root: Path, host: str, port: int) -> None:
        self.root = root.resolve()
        manifest = self.root / MANIFEST
        try:
            self.manifest_bytes = manifest.read_bytes()
            self.files = load_manifest(json.loads(self.manifest_bytes), str(manifest))
        except (OSError, ValueError, KeyError) as exc:
            raise FormatError(f"cannot read {manifest}: {exc}; deploy again") from exc
        super().__init__((host, port), _Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve a deployment's stage files (see docs/swarm.md)")
    parser.add_argument("--root", type=Path, required=True, help="the deployment directory")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s artifacts %(message)s", stream=sys.stderr)
    host, _, port = args.listen.rpartition(":")
    try:
        server = ArtifactServer(args.root, host or "0.0.0.0", int(port))
    except (FormatError, OSError) as exc:
        print(f"artifacts: {exc}", file=sys.stderr)
        return 1
    log.info("serving %d files of %s on %s", len(server.files), server.root, args.listen)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
