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

__all__ = ["LocalChain", "free_ports", "launch_chain", "start_local_chain"]


@dataclass
class LocalChain:
    """Running worker processes; ``processes[i]`` serves ``configs[i]`` (None once stopped)."""

    host: str
    configs: list[WorkerConfig]
    result_port: int
    workdir: Path
    processes: list[subprocess.Popen | None] = field(default_factory=list)
    python: str = sys.executable
    log_level: str = "INFO"
    remove_workdir: bool = False

    @property
    def ports(self) -> list[int]:
        return [c.listen_port for c in self.configs]

    def log_text(self, index: int) -> str:
        """What worker ``index`` wrote to stderr (all its runs)."""
        path = self.workdir / f"stage{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _launch(self, index: int) -> subprocess.Popen:
        config_path = self.workdir / f"stage{index}.json"
        self.configs[index].save(config_path)
        ready = self.workdir / f"stage{index}.ready"
        ready.unlink(missing_ok=True)
        with open(self.workdir / f"stage{index}.log", "ab") as log:
            return subprocess.Popen(
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

    def _wait_ready(self, indices: Sequence[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(indices)
        while waiting:
            for i in sorted(waiting):
                proc = self.processes[i]
                assert proc is not None
                if (self.workdir / f"stage{i}.ready").exists():
                    waiting.discard(i)
                elif proc.poll() is not None:
                    tail = self.log_text(i).strip().splitlines()[-5:]
                    raise EngineError(
                        f"stage {i} worker exited with code {proc.returncode} while starting: "
                        + (" | ".join(tail) or "no output")
                    )
            if waiting and time.monotonic() > deadline:
                raise EngineError(
                    f"stage(s) {sorted(waiting)} did not start listening within {timeout_s} s; "
                    f"see the logs in {self.workdir}"
                )
            if waiting:
                time.sleep(0.01)

    def kill(self, index: int, sig: int = signal.SIGKILL, timeout_s: float = 5.0) -> int | None:
        """Send ``sig`` to worker ``index`` and wait for it to exit; its exit code (None if none)."""
        proc = self.processes[index]
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self.processes[index] = None
        return code

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        """Start worker ``index`` again with the same config (same port) and wait until it listens."""
        if self.processes[index] is not None:
            self.kill(index, signal.SIGTERM)
        self.processes[index] = self._launch(index)
        self._wait_ready([index], timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every worker (SIGKILL after ``timeout_s``)."""
        for proc in self.processes:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for i in range(len(self.processes)):
            self.kill(i, signal.SIGTERM, timeout_s)
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
) -> LocalChain:
    """Start one worker per config (in ``workdir``, a temporary directory if None) and wait until all
    are ready; on any failure stop those already started and re-raise."""
    created = workdir is None
    path = Path(tempfile.mkdtemp(prefix=prefix)) if workdir is None else Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    chain = LocalChain(host, list(configs), result_port, path, log_level=log_level, remove_workdir=created)
    try:
        chain.processes = [chain._launch(i) for i in range(len(configs))]
        chain._wait_ready(range(len(configs)), timeout_s)
    except BaseException:
        chain.stop()
        raise
    return chain
