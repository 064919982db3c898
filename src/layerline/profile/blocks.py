"""Timing and memory of a sliced model's blocks on the device this runs on (used by the agent).

The blocks are run as a chain on random model inputs, so that every block is timed on its real input
tensors (real shapes, real values), whatever its dynamic dimensions. Needs only numpy, onnxruntime and the
standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerline.runtime.session import open_session
from layerline.tensors import TensorSpec

__all__ = ["ChainBlock", "ChainPlan", "make_inputs", "profile_chain", "rss_bytes"]


@dataclass(frozen=True)
class ChainBlock:
    """One block of the chain: the names it reads, the names it produces, the names live after it."""

    index: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    live_after: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "live_after": list(self.live_after),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChainBlock:
        return cls(int(d["index"]), tuple(d["inputs"]), tuple(d["outputs"]), tuple(d["live_after"]))


@dataclass(frozen=True)
class ChainPlan:
    """What to measure: model inputs, blocks in order, batch sizes, runs and threads."""

    inputs: tuple[TensorSpec, ...]
    blocks: tuple[ChainBlock, ...]
    batches: tuple[int, ...]
    warmup: int = 3
    repeats: int = 20
    threads: int = 1
    dims: Mapping[str, int] | None = None
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "blocks": [b.to_json() for b in self.blocks],
            "batches": list(self.batches),
            "warmup": self.warmup,
            "repeats": self.repeats,
            "threads": self.threads,
            "dims": dict(self.dims or {}),
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChainPlan:
        return cls(
            tuple(TensorSpec.from_json(s) for s in d["inputs"]),
            tuple(ChainBlock.from_json(b) for b in d["blocks"]),
            tuple(int(b) for b in d["batches"]),
            int(d["warmup"]),
            int(d["repeats"]),
            int(d["threads"]),
            {str(k): int(v) for k, v in (d.get("dims") or {}).items()},
            int(d.get("seed", 0)),
        )


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is not available)."""
    return _status_kb("VmRSS") or 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_inputs(
    specs: Sequence[TensorSpec], batch: int, dims: Mapping[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random model inputs: floats ~ N(0, 1), integers in [0, 2), booleans at random.

    The leading dynamic dimension is ``batch``; other dynamic dimensions come from ``dims`` by name.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            elif dims and d in dims:
                shape.append(int(dims[d]))
            else:
                raise ValueError(
                    f"input {spec.name!r} has a dynamic dimension {d!r} (axis {i}) with no size; "
                    f"give it with --dim {d}=VALUE"
                )
        dtype = spec.numpy_dtype
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            out[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise ValueError(
                f"input {spec.name!r} has dtype {spec.dtype!r}, which the benchmark cannot generate"
            )
    return out


def profile_chain(
    sources: Mapping[int, bytes | str],
    plan: ChainPlan,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Time and measure every block of ``plan`` at every batch; one result dict per (block, batch).

    ``sources`` maps a block index to its ONNX bytes or file path. Per block: its session is opened once;
    per batch, ``warmup`` untimed runs, then ``repeats`` timed runs of one ``session.run`` each.
    ``progress(done, total)`` is called after each (block, batch).
    """
    lives = {b: make_inputs(plan.inputs, b, plan.dims, plan.seed) for b in plan.batches}
    total = len(plan.blocks) * len(plan.batches)
    done = 0
    results: list[dict[str, Any]] = []
    for block in plan.blocks:
        has_peak = _reset_peak()
        rss0 = rss_bytes()
        session = open_session(sources[block.index], threads=plan.threads)
        names = [o.name for o in session.get_outputs()]
        wanted = [i.name for i in session.get_inputs()]
        for batch in sorted(plan.batches):
            live = lives[batch]
            missing = [n for n in wanted if n not in live]
            if missing:
                raise ValueError(f"block {block.index} needs {missing}, which no earlier block produced")
            feeds = {n: live[n] for n in wanted}
            outputs = dict(zip(names, session.run(names, feeds), strict=True))
            for _ in range(max(plan.warmup - 1, 0)):
                session.run(names, feeds)
            samples = []
            for _ in range(plan.repeats):
                t0 = time.perf_counter()
                session.run(names, feeds)
                samples.append(time.perf_counter() - t0)
            peak = (_status_kb("VmHWM") if has_peak else None) or rss_bytes()
            activations = sum(a.nbytes for a in feeds.values()) + sum(a.nbytes for a in outputs.values())
            results.append(
                {
                    "block": block.index,
                    "batch": batch,
                    "samples_s": samples,
                    "warmup": plan.warmup,
                    "activations_bytes": int(activations),
                    "rss_delta_bytes": max(int(peak - rss0), 0),
                }
            )
            merged = {**live, **outputs}
            lives[batch] = {n: merged[n] for n in block.live_after if n in merged}
            done += 1
            if progress is not None:
                progress(done, total)
        del session
    return results
