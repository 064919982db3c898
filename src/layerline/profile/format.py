"""The profile file written by ``layerline benchmark`` and read by the planner (``docs/profile.md``).

Units are in the field names: ``_s`` seconds, ``_bytes`` bytes, ``_Bps`` bytes per second. A device's link
to itself is implicit (zero latency, infinite bandwidth) and is not stored.

Versioning: a field added later is optional (written only when measured, absent = not measured: e.g.
``latency_s.mean``, ``devices[].hop_overhead_s``), so older profiles still load; ``format_version`` changes
only when a field changes meaning or becomes required.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from layerline.errors import FormatError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BlockMeasurement",
    "DeviceProfile",
    "Failure",
    "LatencyStats",
    "LinkMeasurement",
    "MemoryUse",
    "Profile",
    "load_profile",
    "save_profile",
]

FORMAT = "layerline.profile"
FORMAT_VERSION = 1
_FIX = "re-run `layerline benchmark SLICED -o PROFILE` to write a fresh profile"


@dataclass(frozen=True)
class LatencyStats:
    """Per-run latency of one block over ``repeats`` timed runs after ``warmup`` untimed ones.

    ``mean`` is the total time of the back-to-back runs divided by ``repeats``: the sustained per-run time.
    Under a CPU quota a run shorter than the quota's budget per period often finishes unthrottled, so the
    median understates what a busy stage gets; the mean includes the throttled waits (None in profiles
    written before it was recorded).
    """

    median: float
    p90: float
    min: float
    repeats: int
    warmup: int
    mean: float | None = None

    @property
    def sustained(self) -> float:
        """The mean when recorded, else the median."""
        return self.median if self.mean is None else self.mean

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "median": self.median,
            "p90": self.p90,
            "min": self.min,
            "repeats": self.repeats,
            "warmup": self.warmup,
        }
        if self.mean is not None:
            doc["mean"] = self.mean
        return doc

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyStats:
        mean = d.get("mean")
        return cls(
            float(d["median"]),
            float(d["p90"]),
            float(d["min"]),
            int(d["repeats"]),
            int(d["warmup"]),
            None if mean is None else float(mean),
        )


@dataclass(frozen=True)
class MemoryUse:
    """``weights``: the block's initializer bytes (manifest); ``activations_peak``: bytes of its input and
    output tensors at this batch (measured on the real tensors); ``rss_delta``: the agent's peak resident
    memory increase while opening the block's session and running it (see docs/profile.md)."""

    weights: int
    activations_peak: int
    rss_delta: int

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "activations_peak": self.activations_peak,
            "rss_delta": self.rss_delta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MemoryUse:
        return cls(int(d["weights"]), int(d["activations_peak"]), int(d["rss_delta"]))


@dataclass(frozen=True)
class BlockMeasurement:
    device: str
    block: int
    batch: int
    latency_s: LatencyStats
    memory_bytes: MemoryUse

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "block": self.block,
            "batch": self.batch,
            "latency_s": self.latency_s.to_json(),
            "memory_bytes": self.memory_bytes.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BlockMeasurement:
        return cls(
            str(d["device"]),
            int(d["block"]),
            int(d["batch"]),
            LatencyStats.from_json(d["latency_s"]),
            MemoryUse.from_json(d["memory_bytes"]),
        )


@dataclass(frozen=True)
class DeviceProfile:
    """What a device has: cores it may use, its memory, and when it was measured.

    ``hop_overhead_s``: what one stage on this device adds to a request besides its compute and its
    transfers (``layerline.profile.overhead``: the mean under a CPU quota, else the median); None when not
    measured (profiles written before it was recorded), which the planner prices as 0.
    """

    name: str
    address: str
    engine: str
    cores: int
    cpu_quota: float | None
    memory_total_bytes: int
    memory_available_bytes: int
    memory_budget_bytes: int
    measured_at: float
    onnxruntime: str
    labels: Mapping[str, str] = field(default_factory=dict)
    hop_overhead_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "address": self.address,
            "labels": dict(self.labels),
            "engine": self.engine,
            "cores": self.cores,
            "cpu_quota": self.cpu_quota,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_available_bytes": self.memory_available_bytes,
            "memory_budget_bytes": self.memory_budget_bytes,
            "measured_at": self.measured_at,
            "onnxruntime": self.onnxruntime,
        }
        if self.hop_overhead_s is not None:
            doc["hop_overhead_s"] = self.hop_overhead_s
        return doc

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeviceProfile:
        q = d.get("cpu_quota")
        hop = d.get("hop_overhead_s")
        return cls(
            str(d["name"]),
            str(d["address"]),
            str(d["engine"]),
            int(d["cores"]),
            None if q is None else float(q),
            int(d["memory_total_bytes"]),
            int(d["memory_available_bytes"]),
            int(d["memory_budget_bytes"]),
            float(d["measured_at"]),
            str(d["onnxruntime"]),
            {str(k): str(v) for k, v in (d.get("labels") or {}).items()},
            None if hop is None else float(hop),
        )


@dataclass(frozen=True)
class LinkMeasurement:
    """Directed link ``src`` → ``dst``: ``one_way_latency_s`` = median RTT / 2; ``bandwidth_Bps`` from real
    transfers of ``transfer_sizes_bytes`` (formula in docs/profile.md)."""

    src: str
    dst: str
    rtt_median_s: float
    rtt_p90_s: float
    one_way_latency_s: float
    bandwidth_Bps: float
    transfer_sizes_bytes: tuple[int, ...]
    measured_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "rtt_s": {"median": self.rtt_median_s, "p90": self.rtt_p90_s},
            "one_way_latency_s": self.one_way_latency_s,
            "bandwidth_Bps": self.bandwidth_Bps,
            "transfer_sizes_bytes": list(self.transfer_sizes_bytes),
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LinkMeasurement:
        return cls(
            str(d["src"]),
            str(d["dst"]),
            float(d["rtt_s"]["median"]),
            float(d["rtt_s"]["p90"]),
            float(d["one_way_latency_s"]),
            float(d["bandwidth_Bps"]),
            tuple(int(s) for s in d["transfer_sizes_bytes"]),
            float(d["measured_at"]),
        )


@dataclass(frozen=True)
class Failure:
    """A device (or link, ``what="link:DST"``) that could not be measured, and why."""

    device: str
    what: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "what": self.what, "error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Failure:
        return cls(str(d["device"]), str(d["what"]), str(d["error"]))


@dataclass(frozen=True)
class Profile:
    """Everything measured for one sliced model on one cluster."""

    sliced: str
    model_name: str
    manifest_sha256: str
    batch_sizes: tuple[int, ...]
    devices: tuple[DeviceProfile, ...]
    blocks: tuple[BlockMeasurement, ...]
    links: tuple[LinkMeasurement, ...]
    failures: tuple[Failure, ...] = ()
    created_at: float = 0.0
    layerline_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def device(self, name: str) -> DeviceProfile | None:
        return next((d for d in self.devices if d.name == name), None)

    def block(self, device: str, block: int, batch: int) -> BlockMeasurement | None:
        return next((b for b in self.blocks if (b.device, b.block, b.batch) == (device, block, batch)), None)

    def block_latency(self, device: str, block: int, batch: int) -> float | None:
        """Median latency in seconds of ``block`` on ``device`` at ``batch``, or None if not measured."""
        m = self.block(device, block, batch)
        return None if m is None else m.latency_s.median

    def link(self, src: str, dst: str) -> LinkMeasurement | None:
        """The measured link ``src`` → ``dst`` (None for src == dst, which is implicit, or unmeasured)."""
        return next((lk for lk in self.links if (lk.src, lk.dst) == (src, dst)), None)

    def with_sliced(self, sliced: str) -> Profile:
        return replace(self, sliced=sliced)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "created_at": self.created_at,
            "layerline_version": self.layerline_version,
            "sliced": self.sliced,
            "model_name": self.model_name,
            "manifest_sha256": self.manifest_sha256,
            "batch_sizes": list(self.batch_sizes),
            "devices": [d.to_json() for d in self.devices],
            "blocks": [b.to_json() for b in self.blocks],
            "links": [lk.to_json() for lk in self.links],
            "failures": [f.to_json() for f in self.failures],
        }

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        """Parse a profile; FormatError on another format or version, or a missing/bad field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise FormatError(f"not a layerline profile (format={got!r}); {_FIX}")
        if data.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"profile format_version {data.get('format_version')!r} is not supported (this layerline "
                f"reads version {FORMAT_VERSION}); {_FIX}"
            )
        try:
            profile = cls(
                sliced=str(data["sliced"]),
                model_name=str(data["model_name"]),
                manifest_sha256=str(data["manifest_sha256"]),
                batch_sizes=tuple(int(b) for b in data["batch_sizes"]),
                devices=tuple(DeviceProfile.from_json(d) for d in data["devices"]),
                blocks=tuple(BlockMeasurement.from_json(b) for b in data["blocks"]),
                links=tuple(LinkMeasurement.from_json(lk) for lk in data["links"]),
                failures=tuple(Failure.from_json(f) for f in data.get("failures", [])),
                created_at=float(data.get("created_at", 0.0)),
                layerline_version=str(data.get("layerline_version", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"malformed profile ({type(exc).__name__}: {exc}); {_FIX}") from exc
        for dev in profile.devices:
            hop = dev.hop_overhead_s
            if hop is not None and not (math.isfinite(hop) and hop >= 0):
                raise FormatError(
                    f"malformed profile: device {dev.name} hop_overhead_s {hop!r} is not a number of "
                    f"seconds >= 0; {_FIX}"
                )
        for lk in profile.links:
            if not (math.isfinite(lk.bandwidth_Bps) and lk.bandwidth_Bps > 0):
                raise FormatError(
                    f"malformed profile: link {lk.src}->{lk.dst} bandwidth_Bps "
                    f"{lk.bandwidth_Bps!r} is not a positive number; {_FIX}"
                )
        return profile


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` atomically; ``sliced`` is stored relative to the file's folder when possible."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sliced = Path(profile.sliced)
    if sliced.is_absolute():
        try:
            sliced_str = os.path.relpath(sliced, p.parent.resolve())
        except ValueError:  # another drive (Windows)
            sliced_str = str(sliced)
        profile = profile.with_sliced(sliced_str)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=1) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def load_profile(path: str | Path) -> Profile:
    """Read a profile; ``sliced`` comes back as an absolute path resolved against the file's folder."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(
            f"no profile at {p}; run `layerline benchmark SLICED -o {p}` to measure one"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read profile {p}: {exc}; {_FIX}") from None
    try:
        profile = Profile.from_json(data)
    except FormatError as exc:
        raise FormatError(f"{p}: {exc}") from None
    sliced = Path(profile.sliced)
    if not sliced.is_absolute():
        sliced = (p.resolve().parent / sliced).resolve()
    return profile.with_sliced(str(sliced))
