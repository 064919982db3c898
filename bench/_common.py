"""Small helpers shared by the benchmarks: machine description, statistics, process memory, tables."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerline.testbed import FleetSpec, TestbedState

__all__ = [
    "MIB",
    "LoadMeter",
    "TestbedLoadMeter",
    "cached_sliced_example",
    "cores",
    "cpu_seconds",
    "interrupts_deferred",
    "loadavg",
    "machine_info",
    "metric_mean",
    "metric_sums",
    "percentile",
    "print_table",
    "read_memory",
    "sigterm_as_interrupt",
    "summarize",
    "testbed_pids",
    "up_testbed_when_free",
    "wait_idle",
]

MIB = 1024 * 1024


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, and the versions that matter."""
    import numpy
    import onnxruntime

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": _cpu_model(),
        "cores": cores(),
        "ram_bytes": _mem_total_bytes(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``n``, ``median``, ``p90``, ``mean``, ``min``, ``max`` of ``values`` (same unit as the input)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": percentile(values, 90),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time ``pid`` (all its threads) has used so far; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


class LoadMeter:
    """How busy the machine was during a phase: our processes, everything else, and hypervisor steal.

    ``with LoadMeter(pids) as m: ...`` then ``m.result``: average cores used by ``pids`` (``ours``), by
    every other process (``others``), stolen by the hypervisor (``steal``), and the phase's ``wall_s``.
    Other processes competing for the cores make every number of the phase slower.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(dict.fromkeys(pids))
        self.result: dict[str, float] = {}

    def _ours(self) -> float:
        return sum(cpu_seconds(p) or 0.0 for p in self.pids)

    def __enter__(self) -> LoadMeter:
        self._t0 = time.monotonic()
        self._ours0 = self._ours()
        self._busy0, self._steal0 = _machine_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy, steal = _machine_cpu()
        ours = self._ours() - self._ours0
        self.result = {
            "wall_s": wall,
            "ours": ours / wall,
            "others": max(0.0, (busy - self._busy0) - ours) / wall,
            "steal": (steal - self._steal0) / wall,
        }


def wait_idle(max_wait_s: float, threshold_cores: float = 0.1, window_s: float = 2.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine used under ``threshold_cores`` over ``window_s``.

    Call it while this benchmark's own processes are idle. Returns the last window's average busy cores.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, _ = _machine_cpu()
        t0 = time.monotonic()
        time.sleep(window_s)
        busy = (_machine_cpu()[0] - busy0) / (time.monotonic() - t0)
        if busy < threshold_cores or time.monotonic() + window_s > deadline:
            return busy


def read_memory(pid: int) -> dict[str, int] | None:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of ``pid`` in bytes; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0]) * 1024
    if "VmRSS" not in found:
        return None
    return {"rss": found["VmRSS"], "hwm": found.get("VmHWM", found["VmRSS"])}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    cells = [row + [""] * (len(headers) - len(row)) for row in cells]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    print()
    print(title)
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def cached_sliced_example(model: str, workdir: Path, say: Callable[[str], None]) -> tuple[Path, Path]:
    """Build and slice a built-in example into ``workdir``, reusing both when they are already there."""
    from layerline.examples import build_example
    from layerline.graph import slice_model

    model_path = workdir / f"{model}.onnx"
    sliced = workdir / f"{model}-sliced"
    if not model_path.is_file():
        say(f"building {model}")
        build_example(model, model_path)
    if not (sliced / "manifest.json").is_file():
        say(f"slicing {model_path.name}")
        slice_model(model_path, sliced)
    return model_path, sliced


def loadavg() -> tuple[float, float, float]:
    """The kernel's 1, 5 and 15 minute load averages (runnable + uninterruptible tasks, not cores)."""
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def sigterm_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so ``finally`` blocks (a testbed's ``down``) run on kill too."""

    def _raise(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM inside the block (clean-up that must not be cut short), then restore."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def up_testbed_when_free(
    spec: FleetSpec, home: Path, say: Callable[[str], None], wait_s: float = 600.0
) -> tuple[TestbedState, float, float]:
    """``layerline.testbed.up``, waiting (bounded by ``wait_s``) while another testbed holds the subnet.

    Only one testbed can be up per host (a test run may hold it). Returns the state, the seconds spent
    waiting for the subnet and the seconds the successful ``up`` took.
    """
    from layerline.testbed import TestbedError, up

    started = time.monotonic()
    deadline = started + wait_s
    announced = False
    while True:
        t0 = time.monotonic()
        try:
            state = up(spec, home)
        except TestbedError as exc:
            if "already routes" not in str(exc) or time.monotonic() > deadline:
                raise
            if not announced:
                say(f"another testbed is up on this host; waiting up to {wait_s:.0f} s for it to go")
                announced = True
            time.sleep(2.0)
            continue
        return state, t0 - started, time.monotonic() - t0


def testbed_pids(state: TestbedState) -> list[int]:
    """Every process in the testbed's devices (their cpu cgroups and the cgroups beneath them, so a
    device dockerd's containers too) and the testbed's own daemons (delayers, dockerds)."""
    pids: list[int] = [r.pid for r in state.processes() if r.pid is not None]
    for dev in state.devices:
        for procs in Path(dev.cpu_cgroup).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids += [int(p) for p in procs.read_text().split()]
    return list(dict.fromkeys(pids))


_METRIC = re.compile(r'^(layerline_\w+?)_(sum|count)\{(?:[^}]*?stage="(\d+)")?[^}]*\}\s+(\S+)$', re.M)


def metric_sums(text: str) -> dict[tuple[str, str], float]:
    """``(metric_sum|metric_count, stage)`` → value of a gateway's ``/metrics`` histograms (stage "" when
    the series has no stage label), summed over the other labels."""
    out: dict[tuple[str, str], float] = {}
    for metric, kind, stage, value in _METRIC.findall(text):
        key = (f"{metric}_{kind}", stage)
        out[key] = out.get(key, 0.0) + float(value)
    return out


def metric_mean(before: dict, after: dict, metric: str, stage: str) -> float | None:
    """The mean of histogram ``metric`` (of ``stage``) between two :func:`metric_sums` readings."""
    count = after.get((f"{metric}_count", stage), 0.0) - before.get((f"{metric}_count", stage), 0.0)
    total = after.get((f"{metric}_sum", stage), 0.0) - before.get((f"{metric}_sum", stage), 0.0)
    return total / count if count > 0 else None


def _cpuacct_dirs(state: TestbedState) -> list[Path]:
    """The devices' cpuacct cgroups (only ``swarm: true`` devices have one: their dockerd joins every
    hierarchy, and its containers nest beneath it)."""
    found = []
    for dev in state.devices:
        for group in dev.daemon.cgroups if dev.daemon else ():
            if (Path(group) / "cpuacct.usage").is_file():
                found.append(Path(group))
    return found


class TestbedLoadMeter(LoadMeter):
    """:class:`LoadMeter` where "ours" is everything the testbed runs, even processes that come and go.

    CPU time of the devices' cpuacct cgroups (a swarm device's dockerd, its image builds and containers;
    hierarchical, so short-lived processes count) plus that of the processes inside the devices that are
    not in those groups when the phase starts (local-engine workers join only the cpu and memory
    hierarchies), the testbed's daemons, this process, its reaped children and ``extra_pids``. "others"
    is then the load of the rest of the machine (other jobs).
    """

    __test__ = False

    def __init__(self, state: TestbedState, extra_pids: Sequence[int] = ()) -> None:
        self.groups = _cpuacct_dirs(state)
        in_groups: set[int] = set()
        for group in self.groups:
            for procs in group.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    in_groups.update(int(p) for p in procs.read_text().split())
        pids = [p for p in [*testbed_pids(state), os.getpid(), *extra_pids] if p not in in_groups]
        super().__init__(pids)

    def _ours(self) -> float:
        import resource

        # + children of this process that ended and were reaped (docker save/load, docker build clients)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        total = super()._ours() + children.ru_utime + children.ru_stime
        for group in self.groups:
            with contextlib.suppress(OSError, ValueError):
                total += int((group / "cpuacct.usage").read_text()) / 1e9
        return total
