"""Replicas of a local deployment's stages, driven through its recorded processes.

:class:`LocalReplicaScaler` implements :class:`~layerline.runtime.scaling.ReplicaScaler` for a deployment
of the ``local`` engine with the Redis transport. It holds no process handles: every call reads the
deployment's state file (``deployment.json``), so ``layerline scale`` in another terminal, the
deployment's autoscaler process and the engine itself all act on the same replicas.

* A replica of stage k is ``python -m layerline.runtime.worker --config stages/stage<k>.json
  --ready-file run/stage<k>.r<slot>.ready``, recorded with role ``stage<k>.r<slot>``; a new one takes
  the slot after the highest recorded one, so the highest slot is always the newest replica.
* ``scale(k, n)`` holds the stage's own lock (``.stage<k>.lock``) for the whole operation, and the state
  lock only while it reads and rewrites the state file (atomically). It first forgets replicas that have
  died, then records the new desired count; new replicas are recorded right after they are spawned and
  waited for (their ready file: they consume); stopped replicas are the newest ones: SIGTERM (each
  finishes and hands on what it holds, ``docs/redis.md``), SIGKILL after ``drain_timeout_s`` (what a
  killed replica held is taken over by the others), then their records go.
* A replica is moved into its device's cpu group (``extra.cgroups``) right after it is spawned, like the
  replicas ``deploy`` starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from layerline.engines import processes
from layerline.engines.state import (
    DeploymentState,
    ProcessRecord,
    deployment_dir,
    load_state,
    parse_role,
    replica_role,
    state_lock,
    update_state,
)
from layerline.errors import EngineError

__all__ = ["LocalReplicaScaler", "replica_ready_file", "start_replica", "wait_json_file"]

log = logging.getLogger(__name__)


def replica_ready_file(workdir: Path, stage: int, slot: int) -> Path:
    """Where replica ``slot`` of ``stage`` writes its ready file (``--ready-file``) once it consumes."""
    return workdir / "run" / f"{replica_role(stage, slot)}.ready"


def start_replica(workdir: Path, stage: int, slot: int, group: Path | None = None) -> ProcessRecord:
    """Start replica ``slot`` of redis stage ``stage`` of the deployment in ``workdir`` (worker config
    ``stages/stage<k>.json``, log ``logs/stage<k>.r<slot>.log``), moved into cpu ``group`` when given,
    before it has loaded anything; its record (its ready file appears once it consumes)."""
    role = replica_role(stage, slot)
    log_path = workdir / "logs" / f"{role}.log"
    ready = replica_ready_file(workdir, stage, slot)
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    config = workdir / "stages" / f"stage{stage}.json"
    proc = processes.spawn(
        ["-m", "layerline.runtime.worker", "--config", str(config), "--ready-file", str(ready)], log_path
    )
    if group is not None:
        from layerline.engines.placement import join_cpu_group

        try:
            join_cpu_group(group, proc.pid)
        except EngineError:
            proc.kill()
            proc.wait()
            raise
    return ProcessRecord(role, proc.pid, str(log_path), None)


def wait_json_file(
    path: Path, proc: subprocess.Popen, what: str, log_path: Path, timeout_s: float
) -> dict[str, object]:
    """The JSON ``proc`` writes to ``path`` once it runs; EngineError (with its log) if it exits first
    or does not write it within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with code {proc.returncode}" if proc.poll() is not None else "did not start"
            raise EngineError(
                f"{what} {why} within {timeout_s:.0f} s; its log ({log_path}) ends with:\n"
                f"{processes.tail(log_path) or '(empty)'}"
            )
        time.sleep(0.02)
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


class LocalReplicaScaler:
    """Starts and stops the replicas of local deployment ``name`` (see the module docstring).

    ``drain_timeout_s``: how long a stopped replica may take to finish what it holds before SIGKILL;
    ``start_timeout_s``: how long a new replica may take to start consuming.
    """

    def __init__(self, name: str, *, drain_timeout_s: float = 30.0, start_timeout_s: float = 60.0) -> None:
        state = load_state(name)
        if state.engine != "local":
            raise EngineError(
                f"deployment {name!r} runs on the {state.engine} engine; this scaler drives local deployments"
            )
        self.name = name
        self.workdir = deployment_dir(name)
        self.drain_timeout_s = drain_timeout_s
        self.start_timeout_s = start_timeout_s

    @property
    def stage_count(self) -> int:
        return len(load_state(self.name).stages)

    def replicas(self, stage: int) -> int:
        """How many recorded replicas of ``stage`` run now."""
        state = load_state(self.name)
        self._check_stage(state, stage)
        return sum(1 for p in state.replica_records(stage) if processes.is_running(p.pid))

    def desired(self, stage: int) -> int:
        """The replica count last asked for (``deploy --replicas``, ``scale``)."""
        state = load_state(self.name)
        self._check_stage(state, stage)
        return state.desired_replicas(stage)

    def _check_stage(self, state: DeploymentState, stage: int) -> None:
        if not 0 <= stage < len(state.stages):
            raise ValueError(
                f"stage {stage} does not exist: deployment {self.name!r} has stages "
                f"0..{len(state.stages) - 1}"
            )

    def _check(self, state: DeploymentState, stage: int, n: int) -> None:
        self._check_stage(state, stage)
        if n < 0:
            raise ValueError(f"stage {stage}: a replica count must be >= 0, got {n}")
        if state.extra.get("transport") != "redis" and n != 1:
            raise ValueError(
                f"deployment {self.name!r} uses the TCP transport, which runs exactly one worker per stage "
                f"(its upstream connects to one port), got {n} replicas for stage {stage}; deploy with "
                "--transport redis for replicas"
            )

    def scale(self, stage: int, n: int, *, timeout_s: float | None = None) -> None:
        """Run exactly ``n`` replicas of ``stage``; returns once new ones consume and stopped ones have
        exited. ValueError for a bad stage or count, EngineError when a new replica does not start
        (the ones this call started are stopped again and the desired count is the running one)."""
        state = load_state(self.name)
        self._check(state, stage, n)
        if state.extra.get("transport") != "redis":  # TCP: nothing to start or stop, only to check
            if not any(processes.is_running(p.pid) for p in state.replica_records(stage)):
                raise EngineError(
                    f"stage {stage} of deployment {self.name!r} is not running; a TCP stage cannot be "
                    f"restarted on its own: `layerline down --name {self.name}` and deploy again"
                )
            return
        wait = self.start_timeout_s + self.drain_timeout_s if timeout_s is None else timeout_s
        with state_lock(self.name, f"stage{stage}", timeout_s=wait):
            running = self._prune(stage, n)
            if n > len(running):
                self._start(stage, n - len(running), self.start_timeout_s if timeout_s is None else timeout_s)
            elif n < len(running):
                self._stop(stage, running[n:], self.drain_timeout_s if timeout_s is None else timeout_s)

    def _prune(self, stage: int, n: int) -> list[ProcessRecord]:
        """Forget the stage's dead replicas and record ``n`` as wanted; its running replicas, oldest first."""
        alive: list[ProcessRecord] = []

        def change(state: DeploymentState) -> DeploymentState:
            records = state.replica_records(stage)
            alive[:] = [p for p in records if processes.is_running(p.pid)]
            for dead in (p for p in records if p not in alive):
                log.warning(
                    "stage %d: replica %s (pid %d) had exited; forgetting it (its log: %s)",
                    stage,
                    dead.role,
                    dead.pid,
                    dead.log,
                )
            kept = tuple(p for p in state.processes if p in alive or p not in records)
            return _with_desired(replace(state, processes=kept), stage, n)

        update_state(self.name, change)
        return alive

    def _start(self, stage: int, count: int, timeout_s: float) -> None:
        started: list[ProcessRecord] = []

        def add(state: DeploymentState) -> DeploymentState:
            slots = [parse_role(p.role)[1] for p in state.replica_records(stage)]  # type: ignore[index]
            first = max(slots, default=-1) + 1
            device = str(state.stages[stage].get("device", "local"))
            group = (state.extra.get("cgroups") or {}).get(device)
            if group is None and state.stages[stage].get("cpu_quota") is not None:
                raise EngineError(
                    f"stage {stage}'s device {device!r} has a cpu_quota but the deployment has no cpu group "
                    "for it; deploy again"
                )
            for slot in range(first, first + count):
                started.append(start_replica(self.workdir, stage, slot, Path(group) if group else None))
            return _insert(state, stage, started)

        try:
            update_state(self.name, add)  # recorded as soon as spawned: `down` stops them too
            self._wait_started(stage, started, timeout_s)
        except BaseException:
            for record in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):  # the deployment may be gone (`down` meanwhile)
                update_state(self.name, lambda s: _forget(s, stage, started, running_only=True))
            raise
        log.info("stage %d: started %s", stage, ", ".join(f"{p.role} (pid {p.pid})" for p in started))

    def _wait_started(self, stage: int, started: list[ProcessRecord], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = list(started)
        while waiting:
            for record in list(waiting):
                slot = parse_role(record.role)[1]  # type: ignore[index]
                if replica_ready_file(self.workdir, stage, slot).exists():
                    waiting.remove(record)
                elif not processes.is_running(record.pid):
                    raise EngineError(
                        f"stage {stage} replica {record.role} exited while starting; its log ({record.log}) "
                        f"ends with:\n{processes.tail(Path(record.log)) or '(empty)'}"
                    )
            if waiting and time.monotonic() > deadline:
                raise EngineError(
                    f"stage {stage} replica(s) {', '.join(r.role for r in waiting)} did not start consuming "
                    f"within {timeout_s:.0f} s; see {self.workdir / 'logs'}"
                )
            if waiting:
                time.sleep(0.02)

    def _stop(self, stage: int, victims: list[ProcessRecord], timeout_s: float) -> None:
        """SIGTERM ``victims`` (they drain), SIGKILL those still running after ``timeout_s``, forget them."""
        for record in victims:
            if processes.is_running(record.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(processes.is_running(r.pid) for r in victims):
            time.sleep(0.02)
        killed = [r for r in victims if processes.is_running(r.pid)]
        for record in killed:
            log.warning(
                "stage %d: %s (pid %d) did not drain within %.0f s; killing it (the other replicas take over "
                "what it held)",
                stage,
                record.role,
                record.pid,
                timeout_s,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(processes.is_running(r.pid) for r in killed):
            time.sleep(0.02)
        update_state(self.name, lambda s: _forget(s, stage, victims))
        log.info("stage %d: stopped %s", stage, ", ".join(f"{p.role} (pid {p.pid})" for p in victims))


def _with_desired(state: DeploymentState, stage: int, n: int) -> DeploymentState:
    stages = list(state.stages)
    stages[stage] = {**stages[stage], "replicas": n}
    return replace(state, stages=tuple(stages))


def _insert(state: DeploymentState, stage: int, records: list[ProcessRecord]) -> DeploymentState:
    """``records`` placed after the stage's last worker (or before the next stage's / the gateway)."""
    procs = list(state.processes)
    at = 0
    for i, p in enumerate(procs):
        role = parse_role(p.role)
        if (role is not None and role[0] <= stage) or p.role == "redis":
            at = i + 1
    return replace(state, processes=(*procs[:at], *records, *procs[at:]))


def _forget(
    state: DeploymentState, stage: int, records: list[ProcessRecord], running_only: bool = False
) -> DeploymentState:
    """Without ``records``; with ``running_only`` the desired count becomes what still runs."""
    pids = {r.pid for r in records}
    state = replace(state, processes=tuple(p for p in state.processes if p.pid not in pids))
    if running_only:
        running = sum(1 for p in state.replica_records(stage) if processes.is_running(p.pid))
        state = _with_desired(state, stage, running)
    return state
