"""Helpers of the integration tests: real local deployments, plain HTTP, and monolithic references."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from layerline.engines.local import DeploySettings, LocalEngine
from layerline.engines.processes import free_port
from layerline.engines.stages import resolve_target
from layerline.engines.state import DeploymentState
from layerline.errors import DeploymentExists, EngineError, LayerlineError
from layerline.runtime.session import open_session

__all__ = ["THREADS", "deployed", "error_message", "http_request", "monolithic"]

#: Threads per onnxruntime session, in the deployments and in the monolithic references alike.
THREADS = 1


def _port_conflict(exc: LayerlineError) -> bool:
    """Whether a deploy failed because a port it picked was taken before a process of it could bind it."""
    text = str(exc)
    return "Address already in use" in text or ("port" in text and "in use" in text)


@contextlib.contextmanager
def deployed(
    sliced: Path, stages: int, name: str, **settings: Any
) -> Iterator[tuple[LocalEngine, DeploymentState]]:
    """Deploy ``sliced`` in ``stages`` balanced stages with the local engine; always taken down after.

    The engine picks free ports and its processes bind them later, so another program on the machine can
    take one in between; such a port conflict (only that) is retried once, with a warning.
    """
    engine = LocalEngine()
    target = resolve_target(sliced, stages)
    assert len(target.ranges) == stages, target.ranges
    options = {"threads": THREADS, "ready_timeout_s": 120.0, **settings}
    try:
        state = engine.deploy(target, DeploySettings(name=name, port=free_port(), **options))
    except (DeploymentExists, EngineError) as exc:
        if not _port_conflict(exc):
            raise
        warnings.warn(f"deploy {name!r} hit a port conflict, retrying once: {exc}", stacklevel=3)
        state = engine.deploy(target, DeploySettings(name=name, port=free_port(), **options))
    try:
        yield engine, state
    finally:
        engine.down(name)


def monolithic(model: Path, feeds: Mapping[str, np.ndarray], exact: bool) -> dict[str, np.ndarray]:
    """The whole model's outputs, by name, from one onnxruntime session run the way the stages run."""
    session = open_session(model, THREADS, exact)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def http_request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    chunked: bool = False,
    timeout_s: float = 30.0,
) -> tuple[int, bytes, float]:
    """One request over a fresh ``http.client`` connection: (status, body, seconds it took).

    ``chunked`` sends the body with chunked transfer encoding (no Content-Length header).
    """
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    t0 = time.monotonic()
    try:
        if chunked:
            assert body is not None
            step = 16 * 1024
            chunks = (body[i : i + step] for i in range(0, len(body), step))
            conn.request(method, path, body=chunks, headers=dict(headers or {}), encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, payload, time.monotonic() - t0
    finally:
        conn.close()


def error_message(payload: bytes) -> str:
    """The ``error`` text of a gateway error response (the raw body if it is not the error JSON)."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", "replace")
    return str(obj.get("error", obj)) if isinstance(obj, dict) else str(obj)
