"""The arithmetic of the benchmark, as pure functions (units in the names; formulas in docs/profile.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bandwidth_Bps", "median_p90", "one_way_latency_s", "transfer_sizes"]

#: The transfer time minus one RTT is floored at this fraction of the transfer time, so that a payload
#: small enough to fit in the socket buffers (its time ≈ one RTT) cannot yield an absurd bandwidth.
MIN_TRANSFER_FRACTION = 0.05


def median_p90(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """(median, 90th percentile, min) of per-run samples, each one run's time (never divided by a batch)."""
    if not samples_s:
        raise ValueError("no samples")
    arr = np.asarray(samples_s, dtype=np.float64)
    return float(np.median(arr)), float(np.percentile(arr, 90)), float(arr.min())


def one_way_latency_s(rtt_median_s: float) -> float:
    """One-way latency = round-trip time / 2 (symmetric link assumed)."""
    return rtt_median_s / 2.0


def bandwidth_Bps(size_bytes: int, transfer_s: float, rtt_s: float) -> float:
    """Bytes per second from one acknowledged transfer.

    ``transfer_s`` runs from the first byte sent to the receiver's small acknowledgement coming back; it
    includes one RTT (the last byte's one-way trip plus the ack's), so the data rate is
    ``size / (transfer_s - rtt_s)``, the denominator floored at MIN_TRANSFER_FRACTION × transfer_s.
    """
    if size_bytes <= 0 or transfer_s <= 0:
        raise ValueError(f"need a positive size and time, got {size_bytes} bytes in {transfer_s} s")
    return size_bytes / max(transfer_s - rtt_s, MIN_TRANSFER_FRACTION * transfer_s)


def transfer_sizes(
    boundary_bytes: Sequence[int | None], cap: int = 3, minimum: int = 65536
) -> tuple[int, ...]:
    """The distinct sizes crossing cuts to test, largest first, at most ``cap`` of them.

    Always includes the largest; then spreads the rest over the range. Sizes below ``minimum`` are raised
    to it (a tiny transfer measures latency, not bandwidth); unknown sizes (None) are skipped.
    """
    sizes = sorted({max(int(s), minimum) for s in boundary_bytes if s}, reverse=True)
    if not sizes:
        return (minimum,)
    if len(sizes) <= cap:
        return tuple(sizes)
    idx = np.linspace(0, len(sizes) - 1, cap).round().astype(int)
    return tuple(sizes[i] for i in sorted(set(idx.tolist())))
