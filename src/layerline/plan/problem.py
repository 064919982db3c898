"""The placement problem: per-block costs, devices, links between them and constraints.

Units: seconds, bytes and bytes per second throughout. Blocks are numbered 0..L-1; cut ``k`` (0..L) is the
boundary before block ``k`` (cut 0 is the model input, cut L the model output).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from layerline.errors import PlanError

__all__ = ["Device", "PlanningProblem", "full_mesh"]


@dataclass(frozen=True)
class Device:
    """A machine that can run one stage. ``memory_budget_bytes=None`` means unlimited.

    ``type`` names the kind of device (e.g. ``"rpi4"``): it is informational, and ``compute_s`` may be keyed
    by it instead of by the device name. Identical devices are grouped by the optimiser automatically.
    """

    name: str
    memory_budget_bytes: int | None = None
    type: str | None = None


@dataclass(frozen=True)
class PlanningProblem:
    """Everything the optimiser needs, in seconds and bytes.

    ``compute_s[d][b]``: seconds block ``b`` takes on device ``d`` (or on devices of type ``d``) at the
    requested batch size. A stage's memory is ``sum(weight_bytes[b]) + max(activation_bytes[b])`` over its
    blocks. ``boundary_bytes[k]``: bytes crossing cut ``k``. ``latency_s[a][b]`` (one way) and
    ``bandwidth_Bps[a][b]`` describe the link a→b; a missing pair means there is no link; a→a costs 0.
    ``sink`` defaults to ``source``. ``pins`` put a block on a device, ``forbid`` keeps a block off devices,
    ``exclude`` keeps devices out of the plan entirely (an excluded source/sink still sends/receives).
    ``hop_overhead_s[d]``: seconds every stage on device ``d`` (or on devices of type ``d``) costs besides
    its compute and its transfers (the stage process's receive, decode, dispatch, encode and send); a device
    not listed pays 0. After construction it holds one entry per device name.
    """

    compute_s: Mapping[str, Sequence[float]]
    weight_bytes: Sequence[int]
    activation_bytes: Sequence[int]
    boundary_bytes: Sequence[int]
    devices: Sequence[Device]
    latency_s: Mapping[str, Mapping[str, float]]
    bandwidth_Bps: Mapping[str, Mapping[str, float]]
    source: str
    sink: str | None = None
    pins: Mapping[int, str] = field(default_factory=dict)
    forbid: Mapping[int, Collection[str]] = field(default_factory=dict)
    exclude: Collection[str] = frozenset()
    block_names: Sequence[str] | None = None
    hop_overhead_s: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.weight_bytes)
        if n < 1:
            raise PlanError("the problem has no blocks; weight_bytes needs one entry per block")
        if len(self.activation_bytes) != n:
            raise PlanError(
                f"activation_bytes has {len(self.activation_bytes)} entries; give one per block ({n})"
            )
        if len(self.boundary_bytes) != n + 1:
            raise PlanError(
                f"boundary_bytes has {len(self.boundary_bytes)} entries; give one per cut 0..{n} ({n + 1})"
            )
        for label, seq in (
            ("weight_bytes", self.weight_bytes),
            ("activation_bytes", self.activation_bytes),
            ("boundary_bytes", self.boundary_bytes),
        ):
            for i, v in enumerate(seq):
                if not _is_int(v) or v < 0:
                    raise PlanError(f"{label}[{i}] is {v!r}; byte counts must be integers >= 0")
        if self.block_names is not None and len(self.block_names) != n:
            raise PlanError(f"block_names has {len(self.block_names)} names; give one per block ({n})")
        object.__setattr__(self, "weight_bytes", tuple(int(v) for v in self.weight_bytes))
        object.__setattr__(self, "activation_bytes", tuple(int(v) for v in self.activation_bytes))
        object.__setattr__(self, "boundary_bytes", tuple(int(v) for v in self.boundary_bytes))
        self._check_devices()
        object.__setattr__(self, "compute_s", self._device_rows(n))
        object.__setattr__(self, "hop_overhead_s", self._hop_overheads())
        names = set(self.device_names)
        object.__setattr__(
            self, "latency_s", self._links(self.latency_s, "latency_s", names, allow_zero=True)
        )
        object.__setattr__(
            self, "bandwidth_Bps", self._links(self.bandwidth_Bps, "bandwidth_Bps", names, allow_zero=False)
        )
        for role, dev in (("source", self.source), ("sink", self.sink)):
            if dev is not None and dev not in names:
                raise PlanError(f"the {role} device {dev!r} is not one of the devices ({_names(names)})")
        pins: dict[int, str] = {}
        for block, dev in self.pins.items():
            self._check_block(block, "pins")
            if dev not in names:
                raise PlanError(
                    f"pins: block {block} is pinned to unknown device {dev!r}; use one of {_names(names)}"
                )
            pins[int(block)] = dev
        forbid: dict[int, frozenset[str]] = {}
        for block, devs in self.forbid.items():
            self._check_block(block, "forbid")
            devs = frozenset([devs] if isinstance(devs, str) else devs)
            for dev in devs:
                if dev not in names:
                    raise PlanError(
                        f"forbid: block {block} names unknown device {dev!r}; use one of {_names(names)}"
                    )
            forbid[int(block)] = devs
        exclude = frozenset([self.exclude] if isinstance(self.exclude, str) else self.exclude)
        for dev in exclude:
            if dev not in names:
                raise PlanError(f"exclude names unknown device {dev!r}; use one of {_names(names)}")
        object.__setattr__(self, "pins", pins)
        object.__setattr__(self, "forbid", forbid)
        object.__setattr__(self, "exclude", exclude)

    # -- derived values -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.weight_bytes)

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    @property
    def sink_device(self) -> str:
        return self.source if self.sink is None else self.sink

    @property
    def usable_devices(self) -> tuple[str, ...]:
        """Devices that may run a stage (not excluded), in the given order."""
        return tuple(d.name for d in self.devices if d.name not in self.exclude)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise PlanError(f"unknown device {name!r}; use one of {_names(self.device_names)}")

    def block_label(self, block: int) -> str:
        if self.block_names is not None:
            return f"block {block} ({self.block_names[block]!r})"
        return f"block {block}"

    def block_allowed(self, block: int, device: str) -> bool:
        """Whether pins and forbids let ``device`` run ``block`` (exclusion is checked separately)."""
        pinned = self.pins.get(block)
        if pinned is not None and pinned != device:
            return False
        return device not in self.forbid.get(block, ())

    def link(self, a: str, b: str) -> tuple[float, float] | None:
        """(latency_s, bandwidth_Bps) of the link a→b, or None when there is none."""
        lat = self.latency_s.get(a, {}).get(b)
        bw = self.bandwidth_Bps.get(a, {}).get(b)
        if lat is None or bw is None:
            return None
        return lat, bw

    def transfer_s(self, a: str, b: str, nbytes: int) -> float:
        """Seconds to move ``nbytes`` from a to b: 0 on the same device, else latency + bytes / bandwidth."""
        if a == b:
            return 0.0
        link = self.link(a, b)
        if link is None:
            return math.inf
        return link[0] + nbytes / link[1]

    # -- validation helpers ---------------------------------------------------------------------------

    def _check_devices(self) -> None:
        if not self.devices:
            raise PlanError("the problem has no devices; give at least one Device")
        seen: set[str] = set()
        for d in self.devices:
            if not isinstance(d, Device):
                raise PlanError(f"devices must be Device objects, got {d!r}")
            if not d.name:
                raise PlanError("a device has an empty name; give every device a unique name")
            if d.name in seen:
                raise PlanError(f"device {d.name!r} is listed twice; device names must be unique")
            seen.add(d.name)
            budget = d.memory_budget_bytes
            if budget is not None and (not _is_int(budget) or budget < 0):
                raise PlanError(
                    f"device {d.name!r} has memory_budget_bytes={budget!r}; use an integer >= 0 or None"
                )

    def _device_rows(self, n: int) -> dict[str, tuple[float, ...]]:
        rows: dict[str, tuple[float, ...]] = {}
        for d in self.devices:
            row = self.compute_s.get(d.name)
            if row is None and d.type is not None:
                row = self.compute_s.get(d.type)
            if row is None:
                raise PlanError(
                    f"compute_s has no row for device {d.name!r}"
                    + (f" or its type {d.type!r}" if d.type else "")
                    + "; profile it or exclude it"
                )
            if len(row) != n:
                raise PlanError(f"compute_s[{d.name!r}] has {len(row)} entries; give one per block ({n})")
            values = tuple(float(v) for v in row)
            for b, v in enumerate(values):
                if not math.isfinite(v) or v < 0:
                    raise PlanError(
                        f"compute_s[{d.name!r}][{b}] is {v!r}; times must be finite and >= 0 (to keep a "
                        f"block off a device use forbid={{{b}: {{{d.name!r}}}}})"
                    )
            rows[d.name] = values
        return rows

    def _hop_overheads(self) -> dict[str, float]:
        given = dict(self.hop_overhead_s)
        known = set(self.device_names) | {d.type for d in self.devices if d.type is not None}
        for key, v in given.items():
            if key not in known:
                raise PlanError(
                    f"hop_overhead_s names unknown device {key!r}; use device names or types "
                    f"({_names(known)})"
                )
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise PlanError(
                    f"hop_overhead_s[{key!r}] is {v!r}; a stage's overhead must be finite seconds >= 0 "
                    "(leave the device out for none)"
                )
        out: dict[str, float] = {}
        for d in self.devices:
            v = given.get(d.name)
            if v is None and d.type is not None:
                v = given.get(d.type)
            out[d.name] = float(v or 0.0)
        return out

    @staticmethod
    def _links(
        table: Mapping[str, Mapping[str, float]], label: str, names: set[str], allow_zero: bool
    ) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for a, row in table.items():
            if a not in names:
                raise PlanError(f"{label} names unknown device {a!r}; use one of {_names(names)}")
            out[a] = {}
            for b, v in row.items():
                if b not in names:
                    raise PlanError(f"{label}[{a!r}] names unknown device {b!r}; use one of {_names(names)}")
                v = float(v)
                if math.isnan(v) or v < 0 or (v == 0 and not allow_zero) or (allow_zero and math.isinf(v)):
                    need = "finite and >= 0" if allow_zero else "> 0 (inf for an unlimited link)"
                    raise PlanError(
                        f"{label}[{a!r}][{b!r}] is {v!r}; it must be {need}; omit the pair for no link"
                    )
                out[a][b] = v
        return out

    def _check_block(self, block: int, label: str) -> None:
        if not _is_int(block) or not 0 <= block < self.num_blocks:
            raise PlanError(f"{label} names block {block!r}; blocks are 0..{self.num_blocks - 1}")


def full_mesh(
    names: Iterable[str], latency_s: float, bandwidth_Bps: float
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Latency and bandwidth tables with the same link between every ordered pair of distinct devices."""
    names = list(names)
    lat = {a: {b: latency_s for b in names if b != a} for a in names}
    bw = {a: {b: bandwidth_Bps for b in names if b != a} for a in names}
    return lat, bw


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))
