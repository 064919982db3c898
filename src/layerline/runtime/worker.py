"""A stage worker: receives frames from upstream, runs its ONNX stage, sends the result downstream.

Run it as ``python -m layerline.runtime.worker --config worker.json``. It imports only the standard library,
numpy, onnxruntime and the runtime modules it needs (no onnx, aiohttp or prometheus): the worker image has
nothing else.

The stage's loop itself (``StageWorker``, one compute thread, back-pressure, errors travelling back) is in
``layerline.runtime.stage_worker``; this module is its configuration and process entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from layerline.errors import FormatError, TransportError
from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES, Frame, Kind, StageStatus
from layerline.runtime.session import open_session
from layerline.runtime.stage_worker import StageWorker
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.tcp import TcpInbox, TcpOutbox
from layerline.runtime.transport import Inbox, Outbox

__all__ = ["StageWorker", "WorkerConfig", "main"]

log = logging.getLogger(__name__)


#: Stage runs shorter than this (ms, by the last runs' typical time) stay on the event-loop thread when
#: nothing else is queued: the hand-off to the compute thread and back costs 60–80 µs, which kept a 16 KB hop
#: at 0.34–0.41 ms against a 0.34 ms target; inline, 0.30 ms (docs/protocol.md). Longer runs always go
#: to the compute thread, so receiving and sending overlap with compute.
DEFAULT_INLINE_BELOW_MS = 0.2
#: = ``redis_entries.DEFAULT_BLOB_MIN_BYTES`` (not imported: a TCP worker loads no Redis module).
_REDIS_BLOB_MIN_BYTES = 96 * 1024


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one stage worker needs; ``downstream`` is the next stage or the result listener."""

    stage: StageSpec
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    downstream_host: str = "127.0.0.1"
    downstream_port: int = 0
    queue_size: int = 8
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    name: str = ""
    inline_below_ms: float = DEFAULT_INLINE_BELOW_MS
    #: "tcp" (listen/downstream above) or "redis" (the fields below; see docs/redis.md).
    transport: str = "tcp"
    redis_url: str = ""
    stream_prefix: str = "layerline"
    stages: int = 0  # how many stages the deployment has (redis: the last one answers the gateway)
    consumer: str = ""  # this replica's consumer name (default: hostname-pid)
    claim_idle_ms: int = 5000
    max_retries: int = 3
    blob_min_bytes: int = _REDIS_BLOB_MIN_BYTES  # redis: larger results travel as blobs (docs/redis.md)

    format_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        for what, port in (("listen_port", self.listen_port), ("downstream_port", self.downstream_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{what} must be in 0..65535, got {port}")
        if self.inline_below_ms < 0:
            raise ValueError(f"inline_below_ms must be >= 0, got {self.inline_below_ms}")
        if self.max_frame_bytes < 1024:
            raise ValueError(f"max_frame_bytes must be >= 1024, got {self.max_frame_bytes}")
        if self.transport not in ("tcp", "redis"):
            raise ValueError(f"transport must be 'tcp' or 'redis', got {self.transport!r}")
        if self.transport == "redis" and (not self.redis_url or self.stages <= self.stage.index):
            raise ValueError(
                f"the redis transport needs redis_url and stages > the stage index; got "
                f"redis_url={self.redis_url!r}, stages={self.stages}, stage {self.stage.index}"
            )

    @property
    def label(self) -> str:
        return self.name or f"stage {self.stage.index}"

    def to_json(self) -> dict[str, Any]:
        data = {
            "format_version": self.format_version,
            "stage": self.stage.to_json(),
            "listen": {"host": self.listen_host, "port": self.listen_port},
            "downstream": {"host": self.downstream_host, "port": self.downstream_port},
            "queue_size": self.queue_size,
            "max_frame_bytes": self.max_frame_bytes,
            "name": self.name,
            "inline_below_ms": self.inline_below_ms,
        }
        if self.transport != "tcp":
            data["transport"] = self.transport
            data["redis"] = {
                "url": self.redis_url,
                "prefix": self.stream_prefix,
                "stages": self.stages,
                "consumer": self.consumer,
                "claim_idle_ms": self.claim_idle_ms,
                "max_retries": self.max_retries,
                "blob_min_bytes": self.blob_min_bytes,
            }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerConfig:
        version = data.get("format_version")
        if version != cls.format_version:
            raise FormatError(
                f"worker config format_version is {version!r}, this layerline reads {cls.format_version}; "
                "regenerate the worker config with this version"
            )
        try:
            redis = data.get("redis", {})
            return cls(
                stage=StageSpec.from_json(data["stage"]),
                listen_host=str(data["listen"]["host"]),
                listen_port=int(data["listen"]["port"]),
                downstream_host=str(data["downstream"]["host"]),
                downstream_port=int(data["downstream"]["port"]),
                queue_size=int(data.get("queue_size", 8)),
                max_frame_bytes=int(data.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES)),
                name=str(data.get("name", "")),
                inline_below_ms=float(data.get("inline_below_ms", DEFAULT_INLINE_BELOW_MS)),
                transport=str(data.get("transport", "tcp")),
                redis_url=str(redis.get("url", "")),
                stream_prefix=str(redis.get("prefix", "layerline")),
                stages=int(redis.get("stages", 0)),
                consumer=str(redis.get("consumer", "")),
                claim_idle_ms=int(redis.get("claim_idle_ms", 5000)),
                max_retries=int(redis.get("max_retries", 3)),
                blob_min_bytes=int(redis.get("blob_min_bytes", _REDIS_BLOB_MIN_BYTES)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"worker config is malformed ({exc!r}); regenerate it") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> WorkerConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FormatError(f"cannot read worker config {path}: {exc}") from exc
        return cls.from_json(data)


def _describe(args: Any) -> str:
    return ", ".join(f"{a.name}[{a.type} {a.shape}]" for a in args)


def _redis_transport(config: WorkerConfig) -> tuple[Inbox, Outbox]:
    from layerline.runtime.redis_transport import RedisStageLink  # only when used

    link = RedisStageLink(
        config.redis_url,
        config.stage.index,
        last=config.stage.index == config.stages - 1,
        prefix=config.stream_prefix,
        consumer=config.consumer,
        claim_idle_ms=config.claim_idle_ms,
        max_retries=config.max_retries,
        max_frame_bytes=config.max_frame_bytes,
        blob_min_bytes=config.blob_min_bytes,
    )
    return link.inbox, link.outbox


def _tcp_transport(config: WorkerConfig) -> tuple[TcpInbox, TcpOutbox]:
    hello = Frame(Kind.HELLO, 0, statuses=(StageStatus(config.stage.index, True, config.label),))
    inbox = TcpInbox(
        config.listen_host,
        config.listen_port,
        max_frame_bytes=config.max_frame_bytes,
        queue_size=2,  # frames read ahead of the worker's own queue
        name=config.label,
    )
    outbox = TcpOutbox(
        config.downstream_host,
        config.downstream_port,
        max_frame_bytes=config.max_frame_bytes,
        hello=hello,
        name=f"{config.label} downstream",
    )
    return inbox, outbox


async def serve(config: WorkerConfig, session: Any, ready_file: str | None = None) -> None:
    """Serve ``config`` until SIGTERM/SIGINT; writes ``ready_file`` once listening (or consuming)."""
    inbox, outbox = _redis_transport(config) if config.transport == "redis" else _tcp_transport(config)
    port = 0
    worker = StageWorker(
        config.stage,
        session,
        inbox,
        outbox,
        queue_size=config.queue_size,
        label=config.label,
        inline_below_ms=config.inline_below_ms,
    )
    loop = asyncio.get_running_loop()
    on_stop = worker.stop
    if config.transport == "redis":  # drain what this replica holds first (docs/redis.md, "Replicas")
        on_stop = inbox.stop_handler(worker.stop)  # type: ignore[attr-defined]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    await worker.start()
    if isinstance(inbox, TcpInbox):
        port = inbox.port
    log.info(
        "stage %d %s; model %s; inputs %s; outputs %s; forward %s; downstream %s",
        config.stage.index,
        f"listening on {config.listen_host}:{port}" if config.transport == "tcp" else "consuming from Redis",
        config.stage.model_path,
        _describe(session.get_inputs()),
        _describe(session.get_outputs()),
        list(config.stage.forward),
        outbox.peer,
    )
    if ready_file:
        tmp = f"{ready_file}.tmp"
        info = {
            "stage": config.stage.index,
            "host": config.listen_host,
            "port": port,
            "pid": os.getpid(),
        }
        Path(tmp).write_text(json.dumps(info))
        os.replace(tmp, ready_file)
    await worker.wait()
    log.info("stage %d stopped (served %d, failed %d)", config.stage.index, worker.served, worker.failed)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _parse(argv: list[str] | None) -> tuple[WorkerConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="python -m layerline.runtime.worker", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", help="worker config JSON (WorkerConfig.to_json)")
    p.add_argument("--model", help="stage ONNX file (instead of --config)")
    p.add_argument("--stage", type=int, default=0, help="stage index")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on for upstream")
    p.add_argument("--downstream", default=None, help="HOST:PORT of the next stage or result listener")
    p.add_argument("--forward", default="", help="comma-separated tensor names passed on unchanged")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exact", action="store_true")
    p.add_argument("--queue-size", type=int, default=8)
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
    p.add_argument("--name", default="")
    p.add_argument(
        "--inline-below-ms",
        type=float,
        default=DEFAULT_INLINE_BELOW_MS,
        help="run the model on the event-loop thread while its runs take less than this (0: never)",
    )
    p.add_argument("--transport", choices=("tcp", "redis"), default="tcp")
    p.add_argument("--redis-url", default="", help="redis://HOST:PORT/DB (with --transport redis)")
    p.add_argument("--stream-prefix", default="layerline", help="key prefix of the deployment's streams")
    p.add_argument("--stages", type=int, default=0, help="stages in the deployment (redis transport)")
    p.add_argument("--ready-file", help="write {stage, host, port, pid} JSON here once listening")
    p.add_argument("--log-level", default=os.environ.get("LAYERLINE_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if args.config:
        return WorkerConfig.load(args.config), args
    if not args.model or (not args.downstream and args.transport == "tcp"):
        p.error("give --config, or --model and --downstream (or --transport redis)")
    listen_host, listen_port = _host_port(args.listen)
    down_host, down_port = _host_port(args.downstream or "127.0.0.1:0")
    forward = tuple(n for n in args.forward.split(",") if n)
    spec = StageSpec(args.stage, args.model, forward, args.threads, args.exact)
    config = WorkerConfig(
        spec,
        listen_host,
        listen_port,
        down_host,
        down_port,
        args.queue_size,
        args.max_frame_bytes,
        args.name,
        args.inline_below_ms,
        transport=args.transport,
        redis_url=args.redis_url,
        stream_prefix=args.stream_prefix,
        stages=args.stages,
    )
    return config, args


def _release_load_memory() -> None:
    """Hand back to the OS the heap that held the model's protobuf while onnxruntime copied its weights.

    Loading peaks at about twice the weights and glibc keeps ~100 MiB of the freed memory; one
    ``malloc_trim(0)`` brought a 541 MB VGG16 stage from 671 to 583 MiB RSS. No-op without glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("malloc_trim is not available here")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m layerline.runtime.worker``; returns the exit code."""
    try:
        config, args = _parse(argv)
    except (FormatError, ValueError) as exc:
        print(f"layerline worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{config.label}] %(message)s",
        stream=sys.stderr,
    )
    spec = config.stage
    try:
        session = open_session(spec.model_path, spec.threads, spec.exact)
    except Exception as exc:  # onnxruntime raises its own exception types
        print(
            f"layerline worker: {config.label}: cannot load model {spec.model_path}: {exc}", file=sys.stderr
        )
        return 1
    _release_load_memory()
    try:
        asyncio.run(serve(config, session, args.ready_file))
    except (OSError, TransportError) as exc:  # e.g. the port is taken, Redis is not reachable
        print(f"layerline worker: {config.label}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
