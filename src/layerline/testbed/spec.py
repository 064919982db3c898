"""Fleet files: a YAML list of emulated devices, parsed into frozen dataclasses and validated.

```yaml
format_version: 1            # optional; 1 is the only version
name: pis                    # optional, shown by `status`
link: {rate: 100mbit, delay: 10ms, loss: 0%}   # optional default for every device
devices:
  - name: pi1
    cpu: 0.25                # fraction of one core (cgroup cpu quota); 1.5 = one and a half cores
    memory: 512M             # cgroup memory limit: K/M/G (powers of 1024), or bytes
    link: {rate: 100mbit, delay: 10ms, loss: 0.1%}
    delays: {pi2: 30ms}      # optional: packets pi1 receives FROM pi2 wait 30 ms instead of the link delay
    swarm: false             # true: one dockerd inside the device, joined into the fleet's swarm
```

``rate`` is the bandwidth of the device's link in each direction (``kbit``/``mbit``/``gbit``, decimal),
``delay`` the one-way delay added to every packet the device receives (``ms``/``s``), ``loss`` the share of
received packets dropped (``0.5%`` or ``0.005``). ``delays`` overrides ``delay`` per sending device, so the
round trip between A and B is ``delay of B for packets from A + delay of A for packets from B``.
A ``swarm: true`` device needs at least :data:`SWARM_MIN_MEMORY` of memory (its dockerd and containerd run
inside its memory limit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from layerline.testbed.errors import TestbedError

__all__ = [
    "FORMAT_VERSION",
    "SWARM_MIN_MEMORY",
    "DeviceSpec",
    "FleetSpec",
    "LinkSpec",
    "load_fleet",
    "parse_delay",
    "parse_loss",
    "parse_memory",
    "parse_rate",
]

FORMAT_VERSION = 1
MAX_DEVICES = 200
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,14}$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_MEM_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
_DELAY_UNITS = {"ms": 1.0, "s": 1000.0, "us": 0.001}
_DEVICE_KEYS = ("name", "cpu", "memory", "link", "delays", "swarm")
#: Least memory of a ``swarm: true`` device. An idle dockerd + containerd of a swarm node charge 35-45 MB to
#: the device's memory cgroup (peak 54-62 MB while the swarm forms; measured, docs/testbed.md) and each
#: running container adds a containerd-shim of about 10 MB; 256M leaves room for a small workload.
SWARM_MIN_MEMORY = 256 * 2**20


def parse_rate(value: Any) -> int:
    """``"100mbit"`` → 100_000_000 bit/s (decimal units, like ``tc``)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?bit)\s*", str(value).lower())
    if not m:
        raise TestbedError(f"link rate {value!r} is not a rate; write e.g. '100mbit', '20mbit' or '500kbit'")
    bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if not 8_000 <= bits <= 100 * 10**9:
        raise TestbedError(f"link rate {value!r} is out of range; use between 8kbit and 100gbit")
    return bits


def parse_memory(value: Any) -> int:
    """``"512M"`` → 536870912 bytes (``K``/``M``/``G`` are powers of 1024; ``MiB``/``MB`` read the same)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?)(i?b)?\s*", str(value).lower())
    if not m or (m.group(3) and not m.group(2) and m.group(3) != "b"):
        raise TestbedError(f"memory {value!r} is not a size; write e.g. '512M', '2G' or a number of bytes")
    n = int(float(m.group(1)) * _MEM_UNITS[m.group(2)])
    if n < 16 * 2**20:
        raise TestbedError(f"memory {value!r} is below 16M; a device needs at least '16M' to start a process")
    return n


def parse_delay(value: Any) -> float:
    """``"10ms"`` → 10.0 (milliseconds); a bare number is milliseconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", str(value).lower())
    if not m:
        raise TestbedError(f"link delay {value!r} is not a duration; write e.g. '10ms' or '0.04s'")
    ms = float(m.group(1)) * _DELAY_UNITS[m.group(2) or "ms"]
    if ms > 10_000:
        raise TestbedError(f"link delay {value!r} is over 10 s; use a delay of at most '10000ms'")
    return ms


def parse_loss(value: Any) -> float:
    """``"0.5%"`` or ``0.005`` → 0.005 (a probability)."""
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%?)", text)
    if not m:
        raise TestbedError(f"link loss {value!r} is not a share; write e.g. '0.5%' or 0.005")
    p = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not 0.0 <= p < 1.0:
        raise TestbedError(f"link loss {value!r} must be below 100%; write e.g. '1%'")
    return p


@dataclass(frozen=True)
class LinkSpec:
    """A device's link: bandwidth each way (bit/s), one-way receive delay (ms), receive loss (0–1)."""

    rate_bit: int = 1_000_000_000
    delay_ms: float = 0.0
    loss: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"rate_bit": self.rate_bit, "delay_ms": self.delay_ms, "loss": self.loss}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinkSpec:
        return cls(int(data["rate_bit"]), float(data["delay_ms"]), float(data["loss"]))

    @classmethod
    def from_yaml(cls, data: Any, base: LinkSpec | None = None, where: str = "link") -> LinkSpec:
        base = base or cls()
        if data is None:
            return base
        if not isinstance(data, dict):
            raise TestbedError(f"{where} must be a mapping like {{rate: 100mbit, delay: 10ms, loss: 0%}}")
        unknown = set(data) - {"rate", "delay", "loss"}
        if unknown:
            raise TestbedError(f"{where} has unknown keys {sorted(unknown)}; allowed: rate, delay, loss")
        return cls(
            parse_rate(data["rate"]) if "rate" in data else base.rate_bit,
            parse_delay(data["delay"]) if "delay" in data else base.delay_ms,
            parse_loss(data["loss"]) if "loss" in data else base.loss,
        )

    def describe(self) -> str:
        rate = f"{self.rate_bit / 1e9:g}gbit" if self.rate_bit >= 10**9 else f"{self.rate_bit / 1e6:g}mbit"
        return f"{rate} {self.delay_ms:g}ms {self.loss * 100:g}%"


@dataclass(frozen=True)
class DeviceSpec:
    """One emulated device."""

    name: str
    cpu: float
    memory_bytes: int
    link: LinkSpec
    swarm: bool = False
    delays: tuple[tuple[str, float], ...] = ()  # (sending device, ms), sorted: overrides link.delay_ms

    def delay_from(self, device: str) -> float:
        """The delay (ms) of packets this device receives from ``device``."""
        return dict(self.delays).get(device, self.link.delay_ms)

    @property
    def needs_delayer(self) -> bool:
        """Whether any packet this device receives is delayed (by default or from some device)."""
        return self.link.delay_ms > 0 or any(ms > 0 for _, ms in self.delays)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cpu": self.cpu,
            "memory_bytes": self.memory_bytes,
            "link": self.link.to_json(),
            "swarm": self.swarm,
            "delays": dict(self.delays),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceSpec:
        return cls(
            str(data["name"]),
            float(data["cpu"]),
            int(data["memory_bytes"]),
            LinkSpec.from_json(data["link"]),
            bool(data["swarm"]),
            tuple(sorted((str(k), float(v)) for k, v in dict(data.get("delays") or {}).items())),
        )


@dataclass(frozen=True)
class FleetSpec:
    """A whole fleet: its name and devices, in file order."""

    name: str
    devices: tuple[DeviceSpec, ...]
    format_version: int = FORMAT_VERSION

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise TestbedError(f"no device {name!r} in fleet {self.name!r}; devices: {self.device_names()}")

    def device_names(self) -> str:
        return ", ".join(d.name for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "devices": [d.to_json() for d in self.devices],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FleetSpec:
        if data.get("format_version") != FORMAT_VERSION:
            raise TestbedError(
                f"fleet format_version {data.get('format_version')!r} is not supported; "
                f"this layerline reads version {FORMAT_VERSION}"
            )
        return cls(str(data["name"]), tuple(DeviceSpec.from_json(d) for d in data["devices"]))

    @classmethod
    def from_yaml_data(cls, data: Any, default_name: str = "fleet") -> FleetSpec:
        """Validate a parsed YAML document (see the module docstring for the format)."""
        if not isinstance(data, dict) or "devices" not in data:
            raise TestbedError("a fleet file is a mapping with a 'devices:' list; see examples/fleets/")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise TestbedError(f"fleet format_version {version!r} is not supported; write format_version: 1")
        unknown = set(data) - {"format_version", "name", "link", "devices"}
        if unknown:
            raise TestbedError(f"fleet has unknown keys {sorted(unknown)}; allowed: name, link, devices")
        default_link = LinkSpec.from_yaml(data.get("link"), where="top-level link")
        raw = data["devices"]
        if not isinstance(raw, list) or not raw:
            raise TestbedError("'devices:' must be a non-empty list of {name, cpu, memory, link, swarm}")
        if len(raw) > MAX_DEVICES:
            raise TestbedError(
                f"{len(raw)} devices is more than the testbed supports; use at most {MAX_DEVICES}"
            )
        devices: list[DeviceSpec] = []
        for i, item in enumerate(raw):
            devices.append(_device(item, i, default_link))
        names = [d.name for d in devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TestbedError(f"device names must be unique; repeated: {dupes}")
        for d in devices:
            for other, _ in d.delays:
                if other == d.name:
                    raise TestbedError(
                        f"device {d.name!r}: delays names the device itself; list only the other devices "
                        "whose packets it receives late"
                    )
                if other not in names:
                    raise TestbedError(
                        f"device {d.name!r}: delays names {other!r}, which is not a device of this fleet; "
                        f"use one of: {', '.join(n for n in names if n != d.name)}"
                    )
        return cls(str(data.get("name") or default_name), tuple(devices))


def _device(item: Any, index: int, default_link: LinkSpec) -> DeviceSpec:
    where = f"devices[{index}]"
    if not isinstance(item, dict):
        raise TestbedError(f"{where} must be a mapping with {', '.join(_DEVICE_KEYS)}")
    unknown = set(item) - set(_DEVICE_KEYS)
    if unknown:
        raise TestbedError(f"{where} has unknown keys {sorted(unknown)}; allowed: {', '.join(_DEVICE_KEYS)}")
    name = str(item.get("name", ""))
    if not _NAME.match(name):
        raise TestbedError(
            f"{where}: device name {name!r} is invalid; use 1-15 lowercase letters, digits or '-', "
            "starting with a letter (e.g. 'pi1')"
        )
    where = f"device {name!r}"
    for key in ("cpu", "memory"):
        if key not in item:
            raise TestbedError(f"{where} has no '{key}:'; add e.g. cpu: 0.5 and memory: 512M")
    try:
        cpu = float(item["cpu"])
    except (TypeError, ValueError):
        raise TestbedError(f"{where}: cpu {item['cpu']!r} is not a number; write e.g. cpu: 0.25") from None
    if not 0.01 <= cpu <= 1024:
        raise TestbedError(f"{where}: cpu {cpu:g} is out of range; use a fraction of a core >= 0.01")
    swarm = item.get("swarm", False)
    if not isinstance(swarm, bool):
        raise TestbedError(f"{where}: swarm must be true or false, not {swarm!r}")
    memory = parse_memory(item["memory"])
    if swarm and memory < SWARM_MIN_MEMORY:
        raise TestbedError(
            f"{where}: memory {item['memory']!r} is too little for swarm: true (its dockerd and containerd "
            f"run inside the device's limit); give it at least memory: {SWARM_MIN_MEMORY >> 20}M"
        )
    raw_delays = item.get("delays") or {}
    if not isinstance(raw_delays, dict):
        raise TestbedError(f"{where}: delays must be a mapping of device name to delay, e.g. {{pi2: 30ms}}")
    delays = tuple(sorted((str(k), parse_delay(v)) for k, v in raw_delays.items()))
    return DeviceSpec(
        name,
        cpu,
        memory,
        LinkSpec.from_yaml(item.get("link"), default_link, where=f"{where} link"),
        swarm,
        delays,
    )


def load_fleet(path: str | Path) -> FleetSpec:
    """Read and validate a fleet YAML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TestbedError(f"cannot read fleet file {str(p)!r}: {exc.strerror}; check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TestbedError(f"fleet file {str(p)!r} is not valid YAML: {exc}") from None
    return FleetSpec.from_yaml_data(data, default_name=p.stem)
