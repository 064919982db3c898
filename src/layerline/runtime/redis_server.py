"""Start a private ``redis-server`` on a loopback port (tests, benchmarks, ``deploy --redis auto``).

By default the server keeps nothing on disk (``--save ""``, ``--appendonly no``): if it dies, every
queued request is lost (see ``docs/redis.md``). ``appendonly=True`` keeps an append-only file in
``workdir`` (``appendfsync``: ``always`` loses nothing acknowledged even if the server is killed,
``everysec`` up to about a second of writes), so a server started again on the same ``workdir`` has
its streams back. Its process title carries ``layerline`` so that the local engine's process checks
(``layerline.engines.processes.is_running``) recognise it as one of its own.

[Note: allocator] The server runs with ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`` (unless the
environment sets ``MALLOC_CONF``): jemalloc keeps freed pages instead of returning them to the OS, so a
large blob does not fault thousands of fresh pages in on every hop. A 12.8 MB round trip through one
stage took 15–16 ms with it and 37 ms without (bench/bench_redis_hop.py, docs/performance.md); the
cost is that the server's resident memory stays at its peak (the most blobs in flight at once).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from layerline.errors import EngineError

__all__ = ["RedisServer", "redis_server_binary", "start_redis_server"]


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None when it is not installed."""
    return shutil.which("redis-server")


@dataclass
class RedisServer:
    """A running private server; :meth:`stop` ends it."""

    host: str
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(
    port: int,
    workdir: str | Path,
    *,
    host: str = "127.0.0.1",
    timeout_s: float = 10.0,
    new_session: bool = False,
    appendonly: bool = False,
    appendfsync: str = "everysec",
) -> RedisServer:
    """Start ``redis-server`` on ``host:port``, files and log in ``workdir`` (see the module docstring).

    ``new_session`` detaches it from this process's session (the local engine's background processes).
    """
    if appendfsync not in ("always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no; got {appendfsync!r}")
    binary = redis_server_binary()
    if binary is None:
        raise EngineError(
            "redis-server is not installed; install it (Debian/Ubuntu: apt-get install redis-server) "
            "or pass --redis-url of a running Redis"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    args = [
        binary,
        "--bind",
        host,
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        appendfsync,
        "--dir",
        str(workdir),
        "--logfile",
        str(log),
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
        "--proc-title-template",
        "layerline-redis {listen-addr}",
    ]
    env = dict(os.environ)
    env.setdefault("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    proc = subprocess.Popen(
        args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=new_session,
    )
    server = RedisServer(host, port, proc)
    deadline = time.monotonic() + timeout_s
    while not _answers(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise EngineError(
                f"redis-server did not start on {host}:{port} (exit code {proc.returncode}): "
                + (" | ".join(tail) or "no log")
                + "; pick another port or pass --redis-url"
            )
        time.sleep(0.02)
    return server
