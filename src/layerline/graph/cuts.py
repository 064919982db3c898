"""Choosing the cuts: which positions are valid, which of them make "layers", and merging to N blocks.

[Note: the cut rule]
A cut position is *valid* when at most ``max_live_tensors`` non-constant tensors are live there and each of
them is a tensor with a known element type and rank. ``granularity="op"`` takes every valid cut.
``granularity="layer"`` (the default) takes, between two consecutive compute-heavy nodes (see
``cost.HEAVY_OPS``), the one valid cut with the fewest boundary bytes at batch 1 (unknown sizes count as
largest; on a tie, the fewest live tensors, then the latest), and no cut before the first or after the
last heavy node. So cheap ops (activations, norms, pooling, reshapes) join the block of a neighbouring
heavy op, and every block holds at least one heavy op. When no valid cut lies between two heavy nodes,
they share a block. A model without any heavy op treats every op as heavy.
``max_blocks`` then merges neighbouring blocks until at most that many remain, choosing the cuts that
minimise the largest block's estimated FLOPs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["GRANULARITIES", "balance_cuts", "choose_cuts", "layer_cuts"]

GRANULARITIES = ("layer", "op")


def layer_cuts(
    valid: Sequence[int],
    heavy: Sequence[bool],
    cut_bytes: dict[int, int | None],
    live_count: dict[int, int] | None = None,
) -> list[int]:
    """One cut per gap between consecutive heavy positions (see the module note)."""
    heavy_pos = [p for p, h in enumerate(heavy) if h] or list(range(len(heavy)))
    valid_set = set(valid)
    cuts: list[int] = []
    for lo, hi in itertools.pairwise(heavy_pos):
        candidates = [p for p in range(lo + 1, hi + 1) if p in valid_set]
        if not candidates:
            continue

        def key(p: int) -> tuple[float, int, int]:
            b = cut_bytes.get(p)
            return (float("inf") if b is None else float(b), (live_count or {}).get(p, 0), -p)

        cuts.append(min(candidates, key=key))
    return cuts


def balance_cuts(cuts: Sequence[int], flops: Sequence[int], max_blocks: int) -> list[int]:
    """Keep ``max_blocks - 1`` of ``cuts`` so that the largest block's FLOPs is as small as possible."""
    if len(cuts) + 1 <= max_blocks:
        return list(cuts)
    if max_blocks <= 1:
        return []
    bounds = [0, *cuts, len(flops)]
    unit = np.array([sum(flops[a:b]) for a, b in itertools.pairwise(bounds)], dtype=np.float64)
    k = len(unit)
    prefix = np.concatenate([[0.0], np.cumsum(unit)])
    # best[j][i]: smallest max-block cost splitting units [0, i) into j+1 blocks; arg[j][i]: last split.
    best = np.full((max_blocks, k + 1), np.inf)
    arg = np.zeros((max_blocks, k + 1), dtype=np.int64)
    best[0, 1:] = prefix[1:]
    for j in range(1, max_blocks):
        for i in range(j + 1, k + 1):
            s = np.arange(j, i)
            cost = np.maximum(best[j - 1, s], prefix[i] - prefix[s])
            m = int(np.argmin(cost))
            best[j, i] = cost[m]
            arg[j, i] = s[m]
    splits: list[int] = []
    i = k
    for j in range(max_blocks - 1, 0, -1):
        i = int(arg[j, i])
        splits.append(i)
    return [cuts[s - 1] for s in reversed(splits)]


def choose_cuts(
    valid: Sequence[int],
    heavy: Sequence[bool],
    flops: Sequence[int],
    cut_bytes: dict[int, int | None],
    granularity: str,
    max_blocks: int | None,
    live_count: dict[int, int] | None = None,
) -> list[int]:
    """The cut positions to slice at, sorted (see the module note)."""
    assert granularity in GRANULARITIES
    cuts = sorted(valid) if granularity == "op" else layer_cuts(valid, heavy, cut_bytes, live_count)
    if max_blocks is not None:
        cuts = balance_cuts(cuts, flops, max_blocks)
    return cuts
