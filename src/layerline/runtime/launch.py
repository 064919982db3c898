"""Start a whole chain of stage worker processes on this machine (tests, benchmarks, the local engine).

``start_local_chain(specs)`` writes one :class:`~layerline.runtime.worker.WorkerConfig` per stage, starts
``python -m layerline.runtime.worker`` for each on free ports of ``host``, and returns once every worker
listens. Worker ``i`` sends to worker ``i+1``; the last one sends to ``result_port``, where the gateway's
:class:`~layerline.runtime.pipeline.DirectPipeline` listens (workers reconnect until it does).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerline.errors import EngineError
from layerline.runtime.framing import DEFAULT_MAX_FRAME_BYTES
from layerline.runtime.ports import free_ports
from layerline.runtime.stagespec import StageSpec
from layerline.runtime.worker import DEFAULT_INLINE_BELOW_MS, WorkerConfig

__all__ = ["LocalChain", "check_replica_count", "free_ports", "launch_chain", "start_local_chain"]


@dataclass
class LocalChain:
    """Running worker processes of ``configs``, one or more replicas per stage.

    ``replica_sets[i]`` maps replica slot → process for ``configs[i]``; ``processes[i]`` is stage i's
    oldest replica (None once stopped): with one replica per stage (always, over TCP) its process.
    Stages that consume from Redis may run several replicas (:meth:`scale`): each is its own process
    and a distinct consumer of the stage's group. Implements
    :class:`~layerline.runtime.scaling.ReplicaScaler`.
    """

    host: str
    configs: list[WorkerConfig]
    result_port: int
    workdir: Path
    replica_sets: list[dict[int, subprocess.Popen]] = field(default_factory=list)
    python: str = sys.executable
    log_level: str = "INFO"
    remove_workdir: bool = False

    @property
    def ports(self) -> list[int]:
        return [c.listen_port for c in self.configs]

    @property
    def processes(self) -> list[subprocess.Popen | None]:
        """Each stage's oldest replica (lowest slot), None when it has none."""
        return [procs[min(procs)] if procs else None for procs in self.replica_sets]

    @property
    def stage_count(self) -> int:
        return len(self.configs)

    def _paths(self, index: int, slot: int) -> tuple[Path, Path, Path]:
        """Config, ready file and log of a replica (slot 0 keeps the single-replica names)."""
        tag = f"stage{index}" if slot == 0 else f"stage{index}-r{slot}"
        return self.workdir / f"stage{index}.json", self.workdir / f"{tag}.ready", self.workdir / f"{tag}.log"

    def log_text(self, index: int) -> str:
        """What stage ``index``'s workers wrote to stderr (all replicas, all their runs)."""
        paths = [self._paths(index, 0)[2]]
        paths += sorted(
            self.workdir.glob(f"stage{index}-r*.log"), key=lambda p: int(p.stem.rsplit("-r", 1)[1])
        )
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def _launch(self, index: int, slot: int = 0) -> subprocess.Popen:
        config_path, ready, log_path = self._paths(index, slot)
        self.configs[index].save(config_path)
        ready.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "layerline.runtime.worker",
                    "--config",
                    str(config_path),
                    "--ready-file",
                    str(ready),
                    "--log-level",
                    self.log_level,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.replica_sets[index][slot] = proc
        return proc

    def _wait_ready(self, replicas: Sequence[tuple[int, int]], timeout_s: float) -> None:
        """Until each (stage, slot) has written its ready file."""
        deadline = time.monotonic() + timeout_s
        waiting = set(replicas)
        while waiting:
            for i, slot in sorted(waiting):
                proc = self.replica_sets[i][slot]
                if self._paths(i, slot)[1].exists():
                    waiting.discard((i, slot))
                elif proc.poll() is not None:
                    tail = self.log_text(i).strip().splitlines()[-5:]
                    which = f"stage {i} worker" + (f" (replica slot {slot})" if slot else "")
                    raise EngineError(
                        f"{which} exited with code {proc.returncode} while starting: "
                        + (" | ".join(tail) or "no output")
                    )
            if waiting and time.monotonic() > deadline:
                stages = sorted({i for i, _ in waiting})
                raise EngineError(
                    f"stage(s) {stages} did not start listening within {timeout_s} s; "
                    f"see the logs in {self.workdir}"
                )
            if waiting:
                time.sleep(0.01)

    def _end(self, index: int, slot: int, sig: int, timeout_s: float) -> int | None:
        proc = self.replica_sets[index].pop(slot)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def kill(self, index: int, sig: int = signal.SIGKILL, timeout_s: float = 5.0) -> int | None:
        """Send ``sig`` to stage ``index``'s oldest replica and wait for it to exit; its exit code."""
        procs = self.replica_sets[index]
        if not procs:
            return None
        return self._end(index, min(procs), sig, timeout_s)

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        """Start stage ``index``'s oldest replica again (same config, same port), wait until it listens.

        With no replica running, starts one in the first free slot."""
        procs = self.replica_sets[index]
        slot = min(procs) if procs else self._free_slot(index)
        if slot in procs:
            self._end(index, slot, signal.SIGTERM, 5.0)
        self._launch(index, slot)
        self._wait_ready([(index, slot)], timeout_s)

    def _free_slot(self, index: int) -> int:
        return next(s for s in range(len(self.replica_sets[index]) + 1) if s not in self.replica_sets[index])

    def replica_processes(self, index: int) -> list[subprocess.Popen]:
        """Stage ``index``'s running replicas, oldest first."""
        procs = self.replica_sets[index]
        return [procs[s] for s in sorted(procs) if procs[s].poll() is None]

    def replicas(self, stage: int) -> int:
        """How many replicas of ``stage`` are running (replicas that died are forgotten)."""
        self._check_stage(stage)
        procs = self.replica_sets[stage]
        for slot in [s for s, p in procs.items() if p.poll() is not None]:
            del procs[slot]
        return len(procs)

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < len(self.configs):
            raise ValueError(f"stage {stage} does not exist: the chain has stages 0..{len(self.configs) - 1}")

    def scale(self, stage: int, n: int, *, timeout_s: float = 60.0) -> None:
        """Run ``n`` replicas of ``stage``: start new ones (and wait until they consume), or stop the
        newest ones gracefully (SIGTERM: each finishes and hands on what it holds, see docs/redis.md;
        SIGKILL after ``timeout_s``, and what it held is taken over by the others)."""
        check_replica_count(self.configs[stage] if 0 <= stage < len(self.configs) else None, stage, n)
        running = self.replicas(stage)
        if n > running:
            slots = []
            for _ in range(n - running):
                slot = self._free_slot(stage)
                self._launch(stage, slot)
                slots.append(slot)
            try:
                self._wait_ready([(stage, s) for s in slots], timeout_s)
            except BaseException:
                for slot in slots:
                    if slot in self.replica_sets[stage]:
                        self._end(stage, slot, signal.SIGKILL, 5.0)
                raise
        elif n < running:
            victims = sorted(self.replica_sets[stage])[n:]
            for slot in victims:
                with contextlib.suppress(ProcessLookupError):
                    self.replica_sets[stage][slot].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for slot in victims:
                self._end(stage, slot, signal.SIGTERM, max(0.1, deadline - time.monotonic()))

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every worker (SIGKILL after ``timeout_s``)."""
        for procs in self.replica_sets:
            for proc in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for i, procs in enumerate(self.replica_sets):
            for slot in sorted(procs):
                self._end(i, slot, signal.SIGTERM, timeout_s)
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_replica_count(config: WorkerConfig | None, stage: int, n: int) -> None:
    """Refuse a replica count a stage cannot run (ValueError naming the fix)."""
    if config is None:
        raise ValueError(f"stage {stage} does not exist")
    if n < 0:
        raise ValueError(f"stage {stage}: a replica count must be >= 0, got {n}")
    if config.transport != "redis" and n != 1:
        raise ValueError(
            f"stage {stage} uses the TCP transport, which runs exactly one process per stage (its upstream "
            f"connects to one port), got {n} replicas; use the redis transport for replicas"
        )


def start_local_chain(
    specs: Sequence[StageSpec],
    host: str = "127.0.0.1",
    *,
    result_port: int | None = None,
    queue_size: int = 8,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    timeout_s: float = 30.0,
    workdir: str | Path | None = None,
    log_level: str = "INFO",
    inline_below_ms: float = DEFAULT_INLINE_BELOW_MS,
) -> LocalChain:
    """Start one worker process per stage and return when all listen (see the module docstring)."""
    if not specs:
        raise ValueError("start_local_chain needs at least one stage")
    ports = free_ports(len(specs) + (result_port is None), host)
    if result_port is None:
        result_port = ports.pop()
    downstream = [*ports[1:], result_port]
    configs = [
        WorkerConfig(
            stage=spec,
            listen_host=host,
            listen_port=ports[i],
            downstream_host=host,
            downstream_port=downstream[i],
            queue_size=queue_size,
            max_frame_bytes=max_frame_bytes,
            inline_below_ms=inline_below_ms,
        )
        for i, spec in enumerate(specs)
    ]
    return launch_chain(configs, host, result_port, workdir=workdir, log_level=log_level, timeout_s=timeout_s)


def launch_chain(
    configs: Sequence[WorkerConfig],
    host: str,
    result_port: int,
    *,
    workdir: str | Path | None = None,
    log_level: str = "INFO",
    timeout_s: float = 30.0,
    prefix: str = "layerline-chain-",
    replicas: Sequence[int] | None = None,
) -> LocalChain:
    """Start ``replicas[i]`` workers (default one) per config (in ``workdir``, a temporary directory if
    None) and wait until all are ready; on any failure stop those already started and re-raise.
    Only redis-transport stages may have other counts than one (:func:`check_replica_count`)."""
    counts = [1] * len(configs) if replicas is None else list(replicas)
    if len(counts) != len(configs):
        raise ValueError(f"got {len(counts)} replica counts for {len(configs)} stages; give one per stage")
    for i, (config, n) in enumerate(zip(configs, counts, strict=True)):
        check_replica_count(config, i, n)
    created = workdir is None
    path = Path(tempfile.mkdtemp(prefix=prefix)) if workdir is None else Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    chain = LocalChain(host, list(configs), result_port, path, log_level=log_level, remove_workdir=created)
    chain.replica_sets = [{} for _ in configs]
    try:
        started = [(i, slot) for i, n in enumerate(counts) for slot in range(n)]
        for i, slot in started:
            chain._launch(i, slot)
        chain._wait_ready(started, timeout_s)
    except BaseException:
        chain.stop()
        raise
    return chain
