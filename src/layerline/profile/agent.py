"""The profiling agent: one process per device, ``python -m layerline.profile.agent --listen HOST:PORT``.

It answers the controller's JSON-line requests (``layerline.profile.wire``; the operations are listed in
``docs/profile.md``): describe the device, receive block files, time the blocks as a chain, and measure
its link to another agent with real transfers. Needs only the standard library, numpy and onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

import onnxruntime

from layerline.errors import LayerlineError
from layerline.profile.blocks import ChainPlan, profile_chain
from layerline.profile.wire import Channel, connect

__all__ = ["AgentServer", "cgroup_memory", "device_info", "main", "measure_link_from_here", "write_port_file"]

log = logging.getLogger(__name__)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _inactive_file(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, room left) in bytes of the tightest memory cgroup limit on this process, None if unlimited.

    Walks from the process's memory cgroup (v1 ``memory`` controller, else v2) up to the root; for each
    group with a limit, room = limit − usage, where usage leaves out inactive file cache (reclaimable), as
    ``docker stats`` does. A testbed device's memory limit is such a group.
    """
    v1, v2 = None, None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                v1 = path
            elif controllers == "":
                v2 = path
    except (OSError, ValueError):
        return None
    if v1 is not None:
        base, files = cgroup_root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        stat_key, path = "total_inactive_file", v1
    elif v2 is not None:
        base, files, stat_key, path = cgroup_root, ("memory.max", "memory.current"), "inactive_file", v2
    else:
        return None
    best: tuple[int, int] | None = None
    group = base / path.lstrip("/")
    while True:
        limit = _read_int(group / files[0])
        if limit is not None and limit < 2**62:
            used = (_read_int(group / files[1]) or 0) - _inactive_file(group / "memory.stat", stat_key)
            room = max(limit - max(used, 0), 0)
            if best is None or room < best[1]:
                best = (limit, room)
        if group == base or base not in group.parents:
            return best
        group = group.parent


def device_info(name: str) -> dict[str, Any]:
    """Cores this process may run on, memory total and available (bytes), onnxruntime version.

    Memory is what ``/proc/meminfo`` says, lowered to the tightest memory cgroup limit on this process
    (a testbed device's limit; see :func:`cgroup_memory`).
    """
    mem = _meminfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total = mem.get("MemTotal", 0)
    available = mem.get("MemAvailable", mem.get("MemFree", 0))
    limited = cgroup_memory()
    if limited is not None:
        total = min(total, limited[0]) if total else limited[0]
        available = min(available, limited[1]) if available else limited[1]
    return {
        "name": name,
        "pid": os.getpid(),
        "cores": cores,
        "memory_total_bytes": total,
        "memory_available_bytes": available,
        "onnxruntime": onnxruntime.__version__,
    }


def measure_link_from_here(
    host: str, port: int, pings: int, sizes: list[int], repeats: int, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Ping-pong ``pings`` tiny messages, then send each size ``repeats`` times, each acknowledged.

    Returns the raw samples in seconds: ``rtt_s`` (one per ping) and ``transfers`` (size, samples).
    """
    with connect(host, port, timeout_s) as ch:
        ch.call({"op": "echo"})  # connection warm-up, not timed
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            ch.call({"op": "echo"})
            rtts.append(time.perf_counter() - t0)
        transfers = []
        for size in sizes:
            buf = os.urandom(size)
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                reply, _ = ch.call({"op": "sink"}, buf)
                samples.append(time.perf_counter() - t0)
                if reply.get("received") != size:
                    raise LayerlineError(f"peer acknowledged {reply.get('received')} bytes of {size}")
            transfers.append({"size": size, "samples_s": samples})
    return {"rtt_s": rtts, "transfers": transfers}


class _Handler(socketserver.BaseRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        ch = Channel(self.request, f"controller at {self.client_address[0]}", timeout_s=None)
        while True:
            try:
                msg, payload = ch.recv()
            except LayerlineError:
                return
            try:
                reply = self.server.dispatch(ch, msg, payload)
            except Exception as exc:  # report every failure to the controller, keep serving
                log.exception("request %s failed", msg.get("op"))
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                ch.send(reply)
            except LayerlineError:
                return
            if msg.get("op") == "shutdown":
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                return


class AgentServer(socketserver.ThreadingTCPServer):
    """Serves the agent operations; block files are kept in memory between requests."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], name: str) -> None:
        super().__init__(address, _Handler)
        self.name = name
        self.blocks: dict[int, bytes | str] = {}
        self._lock = threading.Lock()

    def dispatch(self, ch: Channel, msg: dict[str, Any], payload: bytes) -> dict[str, Any]:
        op = msg.get("op")
        if op == "hello":
            return {"ok": True, **device_info(self.name)}
        if op == "echo":
            return {"ok": True}
        if op == "sink":
            return {"ok": True, "received": len(payload)}
        if op == "load_block":
            return self._load_block(msg, payload)
        if op == "profile":
            plan = ChainPlan.from_json(msg["plan"])
            with self._lock:  # one chain at a time: two would distort each other's timings
                results = profile_chain(self.blocks, plan, lambda d, t: ch.send({"progress": d, "total": t}))
            return {"ok": True, "results": results}
        if op == "link_test":
            return {
                "ok": True,
                **measure_link_from_here(
                    str(msg["host"]),
                    int(msg["port"]),
                    int(msg["pings"]),
                    [int(s) for s in msg["sizes"]],
                    int(msg["repeats"]),
                    float(msg.get("timeout_s", 60.0)),
                ),
            }
        if op == "hop_overhead":
            from layerline.profile.overhead import measure_hop_overhead

            with self._lock:  # never while a chain is being timed
                hop = measure_hop_overhead(int(msg.get("repeats", 200)), int(msg.get("warmup", 20)))
            # nested: its "payload_bytes" field would read as the wire's payload length at the top level
            return {"ok": True, "hop_overhead": hop.to_json()}
        if op == "shutdown":
            return {"ok": True}
        raise ValueError(f"unknown operation {op!r}")

    def _load_block(self, msg: dict[str, Any], payload: bytes) -> dict[str, Any]:
        index = int(msg["block"])
        if "path" in msg:
            path = str(msg["path"])
            if not Path(path).is_file():
                raise FileNotFoundError(f"block {index}: no file {path} on device {self.name}")
            self.blocks[index] = path
            return {"ok": True, "block": index}
        if len(payload) != int(msg.get("size", -1)):
            raise ValueError(f"block {index}: received {len(payload)} bytes, expected {msg.get('size')}")
        digest = hashlib.sha256(payload).hexdigest()
        if digest != msg.get("sha256"):
            raise ValueError(f"block {index}: sha256 mismatch ({digest} != {msg.get('sha256')})")
        self.blocks[index] = payload
        return {"ok": True, "block": index}


def write_port_file(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically (a reader never sees a partial number)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerline.profile.agent", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (PORT 0: any free port)")
    parser.add_argument("--name", default="device", help="the device name (for messages)")
    parser.add_argument(
        "--port-file", type=Path, help="once listening, write the port here (how the controller learns it)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s agent[{args.name}] %(levelname)s %(message)s"
    )
    host, _, port = args.listen.rpartition(":")
    server = AgentServer((host or "127.0.0.1", int(port)), args.name)
    bound = int(server.server_address[1])
    if args.port_file is not None:
        write_port_file(args.port_file, bound)
    log.info("listening on %s:%d", host or "127.0.0.1", bound)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
