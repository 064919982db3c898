"""A placement problem from measurements: a profile (``layerline benchmark``) + the sliced model's manifest.

Units follow :mod:`layerline.plan.problem`: seconds, bytes, bytes per second.

- ``compute_s[d][b]``: the median latency of block ``b`` on device ``d`` at the requested batch (the mean of
  the back-to-back runs on a device with a CPU quota, whose short runs often escape throttling);
- ``weight_bytes[b]``: the block's weights (manifest, exact);
- ``activation_bytes[b]``: the block's activations and buffers: the larger of the measured
  ``activations_peak`` (its input and output tensors at that batch, largest over devices) and the bytes of
  the cuts on either side of it at that batch (which also hold tensors forwarded past the block); the
  runtime receives and sends tensors in place (zero-copy framing), so no separate copy is counted;
- ``boundary_bytes[k]``: the manifest's ``bytes_batch1`` of cut ``k`` × batch (cut 0 is the model's input,
  so the input size comes from the model's own input shapes);
- devices: ``memory_budget_bytes`` = the device's explicit budget when the profile has one, else
  ``memory_fraction`` × its measured available memory (unlimited when neither is known). The benchmark
  writes the available memory into the profile's ``memory_budget_bytes`` when the cluster sets no
  ``memory_bytes``, so a budget equal to the available memory counts as "not set";
- links: ``one_way_latency_s`` and ``bandwidth_Bps`` of each measured pair; a pair measured in one direction
  only is assumed symmetric (noted); a device→itself link is free;
- ``hop_overhead_s[d]``: the device's measured ``hop_overhead_s`` (what each stage there adds besides compute
  and transfers); a device without one (an older profile) pays 0, noted when other devices have one.

A device with no block measurement at the batch (e.g. a client that only sends requests, or one whose agent
failed) can still be the source or sink but runs no stage (noted).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from layerline.errors import PlanError
from layerline.graph.manifest import Manifest
from layerline.plan.problem import Device, PlanningProblem
from layerline.profile.format import DeviceProfile, Profile

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "ProfileProblem",
    "parse_blocks",
    "parse_exclude",
    "parse_forbid",
    "parse_pins",
    "problem_from_profile",
    "stage_summary",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_FRACTION = 0.8


@dataclass(frozen=True)
class ProfileProblem:
    """The problem built from a profile, plus notes on the assumptions made (printed by the CLI)."""

    problem: PlanningProblem
    batch: int
    memory_fraction: float
    notes: tuple[str, ...] = ()
    unmeasured: tuple[str, ...] = ()
    available_bytes: Mapping[str, int | None] = field(default_factory=dict)


# -- constraint strings --------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_blocks(text: str, num_blocks: int, what: str = "block list") -> list[int]:
    """``"0-3,7"`` → ``[0, 1, 2, 3, 7]`` (ranges inclusive); PlanError naming the bad part."""
    blocks: list[int] = []
    for part in text.split(","):
        m = _RANGE.match(part)
        if not m:
            raise PlanError(
                f"{what}: {part.strip()!r} is not a block number or range; write e.g. '3' or '0-5' "
                f"(blocks are 0..{num_blocks - 1})"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise PlanError(f"{what}: range {part.strip()!r} runs backwards; write it as {hi}-{lo}")
        if hi >= num_blocks:
            raise PlanError(
                f"{what}: block {hi} does not exist; the model has {num_blocks} blocks (0..{num_blocks - 1})"
            )
        blocks.extend(range(lo, hi + 1))
    return blocks


def _split_spec(spec: str, option: str) -> tuple[str, list[str]]:
    left, sep, right = spec.partition("=")
    devices = [d.strip() for d in right.split(",") if d.strip()]
    if not sep or not left.strip() or not devices:
        raise PlanError(f"{option} {spec!r}: expected BLOCKS=DEVICE, e.g. {option} 0-3=edge1")
    return left, devices


def parse_pins(specs: Iterable[str], num_blocks: int) -> dict[int, str]:
    """``["0-3=edge1", "9=edge2"]`` → ``{0: "edge1", ..., 9: "edge2"}``; a block pinned twice is an error."""
    pins: dict[int, str] = {}
    for spec in specs:
        left, devices = _split_spec(spec, "--pin")
        if len(devices) != 1:
            raise PlanError(f"--pin {spec!r}: a block is pinned to one device; give one name after '='")
        for b in parse_blocks(left, num_blocks, f"--pin {spec!r}"):
            if b in pins and pins[b] != devices[0]:
                raise PlanError(
                    f"--pin: block {b} is pinned to both {pins[b]!r} and {devices[0]!r}; keep one"
                )
            pins[b] = devices[0]
    return pins


def parse_forbid(specs: Iterable[str], num_blocks: int) -> dict[int, frozenset[str]]:
    """``["10=edge2", "0-1=edge2,edge3"]`` → ``{10: {"edge2"}, 0: {"edge2", "edge3"}, 1: {...}}``."""
    forbid: dict[int, set[str]] = {}
    for spec in specs:
        left, devices = _split_spec(spec, "--forbid")
        for b in parse_blocks(left, num_blocks, f"--forbid {spec!r}"):
            forbid.setdefault(b, set()).update(devices)
    return {b: frozenset(d) for b, d in forbid.items()}


def parse_exclude(specs: Iterable[str]) -> frozenset[str]:
    """``["edge3", "edge4,edge5"]`` → the device names (repeatable and comma-separated)."""
    return frozenset(d.strip() for spec in specs for d in spec.split(",") if d.strip())


# -- the problem --------------------------------------------------------------------------------


def _boundary_bytes(manifest: Manifest, batch: int) -> list[int]:
    out: list[int] = []
    for boundary in manifest.boundaries:
        total = 0
        for t in boundary.tensors:
            if t.bytes_batch1 is None:
                if boundary.index == 0:
                    where = "a model input"
                elif boundary.index == manifest.num_blocks:
                    where = "a model output"
                else:
                    where = f"cut {boundary.index}"
                raise PlanError(
                    f"tensor {t.spec.name!r} ({where}, shape {list(t.spec.shape)}) has a dynamic non-batch "
                    "dimension, so its size is unknown; export the model with a fixed shape for it (only "
                    "the batch dimension may be dynamic) and slice it again"
                )
            total += t.bytes_batch1 * batch
        out.append(total)
    return out


def _device_budget(dev: DeviceProfile, memory_fraction: float) -> tuple[int | None, int | None, str | None]:
    """(budget, available, note) of one profiled device."""
    name = dev.name
    explicit = dev.memory_budget_bytes
    available = dev.memory_available_bytes
    if explicit > 0 and explicit != available:
        return int(explicit), int(available) or None, None
    if available > 0:
        return int(memory_fraction * available), int(available), None
    return None, None, f"device {name!r}: no memory measurement, so its memory is treated as unlimited"


def problem_from_profile(
    profile: Profile,
    manifest: Manifest,
    *,
    source: str,
    sink: str | None = None,
    batch: int = 1,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    pins: Mapping[int, str] | None = None,
    forbid: Mapping[int, Iterable[str]] | None = None,
    exclude: Iterable[str] = (),
) -> ProfileProblem:
    """The placement problem for ``manifest``'s blocks on ``profile``'s devices; PlanError naming the fix."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise PlanError(f"--batch {batch!r}: the batch size must be a positive integer")
    if not (0 < memory_fraction <= 1):
        raise PlanError(
            f"--memory-fraction {memory_fraction!r}: use a fraction of the available memory in (0, 1]"
        )
    n = manifest.num_blocks
    notes: list[str] = []
    devices_in = list(profile.devices)
    names = [d.name for d in devices_in]
    if not names:
        raise PlanError("the profile has no devices; run `layerline benchmark` with a cluster description")
    for role, dev in (("--source", source), ("--sink", sink)):
        if dev is not None and dev not in names:
            raise PlanError(f"{role} {dev!r} is not a profiled device; use one of {', '.join(names)}")
    exclude = frozenset(exclude)
    for dev in sorted(exclude):
        if dev not in names:
            raise PlanError(f"--exclude {dev!r} is not a profiled device; use one of {', '.join(names)}")

    # Block latencies at this batch, indexed once (the profile may hold several batches and devices).
    latency: dict[str, dict[int, float]] = {name: {} for name in names}
    quota_devices = {d.name for d in devices_in if d.cpu_quota is not None}
    peak: dict[int, int] = {}
    measured_batches: set[int] = set()
    for m in profile.blocks:
        measured_batches.add(m.batch)
        if m.batch != batch:
            continue
        dev, block = m.device, m.block
        if dev not in latency:
            continue
        if not 0 <= block < n:
            raise PlanError(
                f"the profile has a measurement of block {block} but the sliced model has {n} blocks; "
                "the profile is for another slicing: re-run `layerline benchmark` on this sliced model"
            )
        # A device under a CPU quota runs a busy stage throttled: plan from the sustained (mean) time there.
        stats = m.latency_s
        latency[dev][block] = float(stats.sustained if dev in quota_devices else stats.median)
        peak[block] = max(peak.get(block, 0), int(m.memory_bytes.activations_peak))
    if not any(latency.values()):
        have = ", ".join(str(b) for b in sorted(measured_batches)) or "none"
        raise PlanError(
            f"the profile has no block measurements at batch {batch} (measured batch sizes: {have}); "
            f"use --batch with one of those or re-run `layerline benchmark --batch {batch}`"
        )

    compute: dict[str, list[float]] = {}
    unmeasured: list[str] = []
    for name in names:
        row = latency[name]
        missing = [b for b in range(n) if b not in row]
        if len(missing) == n:
            unmeasured.append(name)
            compute[name] = [0.0] * n
            if name not in exclude:
                notes.append(f"device {name!r} has no block measurements at batch {batch}; it runs no stage")
            continue
        if missing and name not in exclude:
            shown = ", ".join(str(b) for b in missing[:8]) + (" …" if len(missing) > 8 else "")
            raise PlanError(
                f"device {name!r} has no measurement at batch {batch} for block(s) {shown}; re-run "
                f"`layerline benchmark` for it or leave it out with --exclude {name}"
            )
        compute[name] = [row.get(b, 0.0) for b in range(n)]
    for block, dev in (pins or {}).items():
        if dev in unmeasured:
            raise PlanError(
                f"--pin puts block {block} on {dev!r}, which has no block measurements at batch {batch}; "
                f"profile it with `layerline benchmark` or pin the block elsewhere"
            )

    boundary = _boundary_bytes(manifest, batch)
    weights = [b.weight_bytes for b in manifest.blocks]
    activations = [max(peak.get(b, 0), boundary[b] + boundary[b + 1]) for b in range(n)]

    hops = {d.name: d.hop_overhead_s for d in devices_in if d.hop_overhead_s is not None}
    planned = [name for name in names if name not in exclude and name not in unmeasured]
    without = [name for name in planned if name not in hops]
    if hops and without:
        notes.append(
            f"device(s) {', '.join(without)} have no hop overhead measurement, so their stages are priced "
            "without one; re-run `layerline benchmark --refresh` to measure it everywhere"
        )

    devices: list[Device] = []
    available: dict[str, int | None] = {}
    for d in devices_in:
        budget, avail, note = _device_budget(d, memory_fraction)
        name = d.name
        available[name] = avail
        if note and name not in exclude and name not in unmeasured:
            notes.append(note)
        devices.append(Device(name, budget))

    lat_table: dict[str, dict[str, float]] = {}
    bw_table: dict[str, dict[str, float]] = {}
    measured: dict[tuple[str, str], tuple[float, float]] = {}
    for link in profile.links:
        a, b = link.src, link.dst
        if a not in latency or b not in latency or a == b:
            continue
        lat, bw = link.one_way_latency_s, link.bandwidth_Bps
        if not (math.isfinite(lat) and lat >= 0 and bw > 0 and not math.isnan(bw)):
            notes.append(f"link {a} -> {b}: unusable measurement (latency {lat}, bandwidth {bw}); no link")
            continue
        measured[(a, b)] = (lat, bw)
    for (a, b), (lat, bw) in list(measured.items()):
        if (b, a) not in measured:
            measured[(b, a)] = (lat, bw)
            notes.append(f"link {b} -> {a} was not measured; assuming it matches {a} -> {b}")
    for (a, b), (lat, bw) in measured.items():
        lat_table.setdefault(a, {})[b] = lat
        bw_table.setdefault(a, {})[b] = bw

    problem = PlanningProblem(
        compute_s=compute,
        weight_bytes=weights,
        activation_bytes=activations,
        boundary_bytes=boundary,
        devices=devices,
        latency_s=lat_table,
        bandwidth_Bps=bw_table,
        source=source,
        sink=sink,
        pins=dict(pins or {}),
        forbid={b: frozenset(d) for b, d in (forbid or {}).items()},
        exclude=exclude | frozenset(unmeasured),
        block_names=None,
        hop_overhead_s=hops,
    )
    for note in notes:
        logger.info("%s", note)
    return ProfileProblem(
        problem=problem,
        batch=batch,
        memory_fraction=memory_fraction,
        notes=tuple(notes),
        unmeasured=tuple(unmeasured),
        available_bytes=available,
    )


def stage_summary(stages: Sequence[tuple[int, int, str]]) -> str:
    """``"0-4@edge1, 5-15@edge2"`` (inclusive block ranges) for tables and messages."""
    return ", ".join(f"{s}-{t - 1}@{d}" if t - s > 1 else f"{s}@{d}" for s, t, d in stages)
