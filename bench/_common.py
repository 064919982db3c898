"""Small helpers shared by the benchmarks: machine description, statistics, process memory, tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MIB",
    "LoadMeter",
    "cached_sliced_example",
    "cores",
    "cpu_seconds",
    "machine_info",
    "percentile",
    "print_table",
    "read_memory",
    "summarize",
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
