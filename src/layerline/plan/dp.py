"""The exact placement DP, vectorised with numpy.

State: (cut i, how many devices of each class are used, class of the last stage's device). A stage
``[i, t)`` on class ``e`` costs ``P_e[t] - P_e[i] + h_e`` (compute plus the class's hop overhead); the
stages allowed for a fixed end ``t`` (memory, pins, forbids and an optional per-stage time limit are all
hereditary: a sub-range of an allowed range is allowed) are exactly the starts ``i`` in a window
``[lo_e(t), t)``. So with
``g[S, e, i]`` = best cost of reaching cut i with the next stage on class e (transfer paid) and
``f[S, e, t]`` = best cost of a chain ending with a stage on e that stops at cut t::

    g[S, e, i] = min_d f[S - e, d, i] + trans[d, e, i]          (first stage: transfer from the source)
    f[S, e, t] = P_e[t] + h_e + min_{i in [lo_e(t), t)} (g[S, e, i] - P_e[i])   (range min, sparse table)

States are processed by the number of devices used, so each layer only reads the previous one. The cost
is O(S·C²·L) for the transfers plus O(S·C·L·log L) for the range minima, with S = prod(count_c + 1)
device-count vectors and C classes (S = 2^D for D distinct devices). A threshold T on every single stage
busy time (compute + overhead) and transfer (for the throughput objective and the throughput floor) just
narrows the windows and removes links, so the same DP answers "least latency with bottleneck <= T" exactly.
"""

from __future__ import annotations

import math

import numpy as np

from layerline.errors import PlanError
from layerline.plan.costs import CostModel
from layerline.plan.grouping import device_classes
from layerline.plan.problem import PlanningProblem

__all__ = ["MAX_STATE_CELLS", "PlacementDP"]

#: The largest DP table (states * classes * cuts) the optimiser builds (two float64 tables of this size).
MAX_STATE_CELLS = 20_000_000


class PlacementDP:
    """The arrays of one problem, and the latency / feasibility DPs over them."""

    def __init__(self, problem: PlanningProblem, group: bool = True) -> None:
        self.problem = problem
        n = problem.num_blocks
        self.n = n
        self.classes = device_classes(problem, problem.usable_devices, group)
        c = len(self.classes)
        if not c:
            raise PlanError("every device is excluded; leave at least one device out of `exclude`")
        counts = np.array([len(m) for m in self.classes], dtype=np.int64)
        self.strides = np.cumprod(np.concatenate(([1], counts[:-1] + 1))).astype(np.int64)
        self.n_states = int(np.prod(counts + 1))
        cells = self.n_states * c * (n + 1)
        if cells > MAX_STATE_CELLS:
            raise PlanError(
                f"planning over {sum(counts)} devices in {c} distinct groups needs {self.n_states} device "
                f"subsets ({cells} DP cells, limit {MAX_STATE_CELLS}); exclude some devices or give "
                "identical devices identical profiles, memory and links so they are grouped"
            )
        ids = np.arange(self.n_states)
        self.units = (ids[:, None] // self.strides[None, :]) % (counts[None, :] + 1)
        self.totals = self.units.sum(axis=1)
        self.layers = [
            [np.flatnonzero((self.totals == k) & (self.units[:, e] >= 1)) for e in range(c)]
            for k in range(int(counts.sum()) + 1)
        ]
        cost_model = CostModel(problem)
        reps = [m[0] for m in self.classes]
        self.prefix = np.stack([cost_model.prefix[r] for r in reps])
        self.hop = np.array([cost_model.overhead[r] for r in reps], dtype=np.float64)
        # busy[e, i, t] = compute + hop overhead of [i, t) on class e, formed exactly as CostModel does
        # ((P[t] - P[i]) + h): threshold comparisons see the cost model's own numbers. Adding a constant
        # keeps it monotone in i, so the allowed starts under a threshold stay an interval.
        self.busy = (self.prefix[:, None, :] - self.prefix[:, :, None]) + self.hop[:, None, None]
        self.base_valid = self._base_valid(cost_model, reps)
        self.trans, self.src, self.snk = self._transfers(reps)
        self.floorlog = np.zeros(n + 2, dtype=np.int64)
        for x in range(2, n + 2):
            self.floorlog[x] = self.floorlog[x // 2] + 1

    # -- arrays -----------------------------------------------------------------------------------------

    def _base_valid(self, cost_model: CostModel, reps: list[str]) -> np.ndarray:
        n = self.n
        problem = self.problem
        act = cost_model.activation
        i_idx = np.arange(n)[:, None]
        j_idx = np.arange(n)[None, :]
        # running[i, j] = max(act[i..j]) for j >= i
        running = np.maximum.accumulate(np.where(j_idx >= i_idx, act[None, :], -1), axis=1)
        wp = cost_model.weight_prefix
        memory = np.zeros((n + 1, n + 1), dtype=np.int64)
        memory[:n, 1:] = (wp[None, 1:] - wp[:n, None]) + running
        upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
        valid = np.empty((len(reps), n + 1, n + 1), dtype=bool)
        for e, rep in enumerate(reps):
            budget = problem.device(rep).memory_budget_bytes
            ok = upper.copy() if budget is None else upper & (memory <= budget)
            banned = np.array([not problem.block_allowed(b, rep) for b in range(n)], dtype=np.int64)
            bp = np.concatenate(([0], np.cumsum(banned)))
            ok &= (bp[None, :] - bp[:, None]) == 0
            valid[e] = ok
        return valid

    def _transfers(self, reps: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        problem = self.problem
        c = len(reps)
        nbytes = np.asarray(problem.boundary_bytes, dtype=np.float64)
        trans = np.full((c, c, self.n + 1), np.inf)
        for d in range(c):
            for e in range(c):
                if d != e:
                    a, b = reps[d], reps[e]
                elif len(self.classes[e]) >= 2:
                    a, b = self.classes[e][0], self.classes[e][1]
                else:
                    continue
                link = problem.link(a, b)
                if link is not None:
                    trans[d, e] = link[0] + nbytes / link[1]
        src = np.array([problem.transfer_s(problem.source, r, problem.boundary_bytes[0]) for r in reps])
        snk = np.array([problem.transfer_s(r, problem.sink_device, problem.boundary_bytes[-1]) for r in reps])
        return trans, src.reshape(c), snk.reshape(c)

    def windows(self, limit: float = math.inf) -> np.ndarray:
        """lo[e, t]: the first allowed start of a stage on class e ending at cut t (lo == t: none)."""
        valid = self.base_valid if math.isinf(limit) else self.base_valid & (self.busy <= limit)
        return np.arange(self.n + 1)[None, :] - valid.sum(axis=1)

    def candidates(self) -> np.ndarray:
        """Every value a plan's bottleneck can take: allowed stage busy times and finite transfers."""
        parts = [self.busy[self.base_valid], self.trans[:, :, 1 : self.n].ravel(), self.src, self.snk]
        values = np.concatenate(parts)
        return np.unique(values[np.isfinite(values)])

    # -- DPs --------------------------------------------------------------------------------------------

    def feasible(self, limit: float = math.inf) -> bool:
        """Whether some placement has every stage busy time and transfer <= limit."""
        n, lo = self.n, self.windows(limit)
        ok_t = np.isfinite(self.trans) & (self.trans <= limit)
        ok_src = np.isfinite(self.src) & (self.src <= limit)
        ok_snk = np.isfinite(self.snk) & (self.snk <= limit)
        reach = np.zeros((self.n_states, len(self.classes), n + 1), dtype=bool)
        cuts = np.arange(n + 1)
        for k in range(1, len(self.layers)):
            for e, states in enumerate(self.layers[k]):
                if not states.size:
                    continue
                if k == 1:
                    rg = np.zeros((1, n + 1), dtype=bool)
                    rg[0, 0] = ok_src[e]
                else:
                    rg = (reach[states - self.strides[e]] & ok_t[None, :, e, :]).any(axis=1)
                cnt = np.concatenate((np.zeros((len(states), 1), np.int64), np.cumsum(rg, axis=1)), axis=1)
                reach[states, e] = (cnt[:, cuts] - cnt[:, lo[e]]) > 0
        return bool((reach[:, :, n] & ok_snk[None, :]).any())

    def min_bottleneck(self) -> float:
        """The smallest achievable bottleneck, exact (binary search over the candidate values); inf if none.

        Every value a feasible plan's bottleneck can take is a candidate, so the largest one is feasible
        whenever any plan is.
        """
        values = self.candidates()
        lo, hi = 0, len(values) - 1
        if hi < 0 or not self.feasible(float(values[hi])):
            return math.inf
        while lo < hi:
            mid = (lo + hi) // 2
            if self.feasible(float(values[mid])):
                hi = mid
            else:
                lo = mid + 1
        return float(values[lo])

    def least_latency(self, limit: float = math.inf) -> list[tuple[int, int, str]] | None:
        """The least-latency placement with every stage busy time and transfer <= limit, or None."""
        n, c = self.n, len(self.classes)
        lo = self.windows(limit)
        trans = np.where(self.trans <= limit, self.trans, np.inf)
        src = np.where(self.src <= limit, self.src, np.inf)
        snk = np.where(self.snk <= limit, self.snk, np.inf)
        f = np.full((self.n_states, c, n + 1), np.inf)
        g = np.full((self.n_states, c, n + 1), np.inf)
        for k in range(1, len(self.layers)):
            for e, states in enumerate(self.layers[k]):
                if not states.size:
                    continue
                if k == 1:
                    g[states, e, 0] = src[e]
                else:
                    g[states, e] = (f[states - self.strides[e]] + trans[None, :, e, :]).min(axis=1)
                best = self._window_min(g[states, e] - self.prefix[e][None, :], lo[e])
                f[states, e] = best + self.prefix[e][None, :] + self.hop[e]
        total = f[:, :, n] + snk[None, :]
        flat = int(np.argmin(total))
        if not math.isfinite(total.flat[flat]):
            return None
        state, e = divmod(flat, c)
        return self._walk_back(f, g, lo, trans, state, e)

    def _window_min(self, x: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """out[:, t] = min(x[:, lo[t]:t]) (inf when empty), by a sparse table over the cut axis."""
        out = np.full(x.shape, np.inf)
        cuts = np.arange(self.n + 1)
        length = cuts - lo
        ends = np.flatnonzero(length > 0)
        if not ends.size:
            return out
        level = self.floorlog[length[ends]]
        table = x
        for j in range(int(level.max()) + 1):
            if j:
                half = 1 << (j - 1)
                table = np.minimum(table[:, :-half], table[:, half:])  # table[:, i] = min x[:, i : i + 2^j]
            sel = ends[level == j]
            if sel.size:
                out[:, sel] = np.minimum(table[:, lo[sel]], table[:, sel - (1 << j)])
        return out

    def _walk_back(
        self, f: np.ndarray, g: np.ndarray, lo: np.ndarray, trans: np.ndarray, state: int, e: int
    ) -> list[tuple[int, int, str]]:
        stop = self.n
        chain: list[tuple[int, int, int]] = []
        while True:
            first = int(lo[e, stop])
            row = g[state, e, first:stop] - self.prefix[e, first:stop]
            start = first + int(np.argmin(row))
            chain.append((start, stop, e))
            if self.totals[state] == 1:
                assert start == 0, "the first stage starts at cut 0"
                break
            prev = state - int(self.strides[e])
            d = int(np.argmin(f[prev, :, start] + trans[:, e, start]))
            state, e, stop = prev, d, start
        chain.reverse()
        used = [0] * len(self.classes)
        stages: list[tuple[int, int, str]] = []
        for start, stop, cls in chain:
            stages.append((start, stop, self.classes[cls][used[cls]]))
            used[cls] += 1
        return stages
