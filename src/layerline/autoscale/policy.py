"""When to add or remove replicas of a stage: pure logic, fed with loads and a clock (no I/O).

Modelled on KEDA's Redis Streams scaler and the Kubernetes HPA it drives (``docs/redis.md``,
"Autoscaling"). Per stage, each poll gives the stage's **backlog**: entries in its stream not yet
delivered to a replica (lag) plus entries delivered and not handed on yet (pending). Then:

* **Raw recommendation** ``ceil(backlog / target)`` (``target``: entries per replica, KEDA's
  ``pendingEntriesCount``/``lagCount``), at least 1 while the stage is *active* (``backlog >
  activation``), clamped to ``[min_replicas, max_replicas]``. An inactive stage recommends
  ``min_replicas`` (0 when it may scale to zero).
* **Stabilisation windows** (the HPA's ``behavior.scaleUp/scaleDown.stabilizationWindowSeconds``):
  scale up only to the *lowest* recommendation of the last ``up_delay_s`` (a burst must last that long),
  scale down only to the *highest* recommendation of the last ``down_delay_s`` (the stage must have
  needed fewer replicas for that long). A window counts only once the policy has watched the stage
  that long, so a fresh controller does not act on one sample. Load that swings between two
  recommendations keeps the current count: no flapping.
* **Activation** (KEDA scales 0 → 1 itself, without the HPA): a stage at 0 replicas whose backlog
  exceeds ``activation`` gets one replica at once, without waiting for the up window; the window then
  governs any further growth. With ``min_replicas`` 0 a stage goes back to 0 after ``down_delay_s``
  without any backlog (KEDA's ``cooldownPeriod``).
* A count outside ``[min, max]`` (changed by hand) is brought back inside at once.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from layerline.errors import FormatError

__all__ = ["AutoscaleConfig", "Decision", "ScalingPolicy", "StagePolicy"]


@dataclass(frozen=True)
class StagePolicy:
    """How one stage scales (see the module docstring)."""

    min_replicas: int = 1
    max_replicas: int = 4
    #: backlog entries (lag + pending) one replica should have at most
    target: float = 4.0
    #: scale-up stabilisation window, seconds
    up_delay_s: float = 2.0
    #: scale-down stabilisation window (and the idle time before scaling to zero), seconds
    down_delay_s: float = 30.0
    #: a stage at zero replicas wakes up when its backlog exceeds this
    activation: int = 0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"need 0 <= min <= max and max >= 1; got min {self.min_replicas}, max {self.max_replicas}"
            )
        if not self.target > 0:
            raise ValueError(f"target (entries per replica) must be > 0, got {self.target}")
        if self.up_delay_s < 0 or self.down_delay_s < 0 or self.activation < 0:
            raise ValueError(
                f"delays and activation must be >= 0; got up {self.up_delay_s}, down {self.down_delay_s}, "
                f"activation {self.activation}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target": self.target,
            "up_delay_s": self.up_delay_s,
            "down_delay_s": self.down_delay_s,
            "activation": self.activation,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StagePolicy:
        return cls(
            min_replicas=int(data["min_replicas"]),
            max_replicas=int(data["max_replicas"]),
            target=float(data["target"]),
            up_delay_s=float(data["up_delay_s"]),
            down_delay_s=float(data["down_delay_s"]),
            activation=int(data.get("activation", 0)),
        )


@dataclass(frozen=True)
class AutoscaleConfig:
    """One :class:`StagePolicy` per stage and how often the controller polls (KEDA's pollingInterval)."""

    stages: tuple[StagePolicy, ...]
    interval_s: float = 0.5

    format_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("an autoscale config needs a policy for at least one stage")
        if not self.interval_s > 0:
            raise ValueError(f"interval must be > 0 s, got {self.interval_s}")

    @classmethod
    def uniform(
        cls, stages: int, policy: StagePolicy | None = None, interval_s: float = 0.5
    ) -> AutoscaleConfig:
        """The same policy for each of ``stages`` stages."""
        return cls(tuple([policy or StagePolicy()] * stages), interval_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "layerline.autoscale",
            "format_version": self.format_version,
            "interval_s": self.interval_s,
            "stages": [s.to_json() for s in self.stages],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AutoscaleConfig:
        if data.get("format") != "layerline.autoscale" or data.get("format_version") != cls.format_version:
            raise FormatError(
                f"not a layerline autoscale config of version {cls.format_version} "
                f"(format={data.get('format')!r}, version={data.get('format_version')!r})"
            )
        try:
            return cls(tuple(StagePolicy.from_json(s) for s in data["stages"]), float(data["interval_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"autoscale config is malformed ({exc}); write it again") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> AutoscaleConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"cannot read autoscale config {path}: {exc}") from exc
        return cls.from_json(data)


@dataclass(frozen=True)
class Decision:
    """What the policy says for one stage at one poll: ``current`` → ``desired`` and why."""

    stage: int
    current: int
    desired: int
    reason: str
    backlog: int

    @property
    def changes(self) -> bool:
        return self.desired != self.current

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "none"


class ScalingPolicy:
    """Decides replica counts for the stages of ``config`` from their backlogs (module docstring).

    :meth:`decide` is deterministic given its arguments and the samples seen so far; ``now`` is any
    monotonic clock in seconds (tests pass their own).
    """

    def __init__(self, config: AutoscaleConfig | Sequence[StagePolicy]) -> None:
        stages = config.stages if isinstance(config, AutoscaleConfig) else tuple(config)
        self.policies = tuple(stages)
        self._samples: list[deque[tuple[float, int]]] = [deque() for _ in self.policies]
        self._since: list[float | None] = [None] * len(self.policies)

    def raw(self, stage: int, backlog: int) -> int:
        """The recommendation for ``backlog`` alone, before any window."""
        p = self.policies[stage]
        active = backlog > p.activation
        wanted = math.ceil(backlog / p.target) if active else 0
        if active:
            wanted = max(wanted, 1)
        return min(p.max_replicas, max(p.min_replicas, wanted))

    def _window(self, stage: int, now: float, seconds: float) -> list[int] | None:
        """Recommendations in force during the last ``seconds`` (None until watched that long)."""
        since = self._since[stage]
        if since is None or now - since < seconds:
            return None
        start = now - seconds
        samples = list(self._samples[stage])
        first = max((i for i, (t, _r) in enumerate(samples) if t <= start), default=0)  # in force then
        return [r for _t, r in samples[first:]]

    def _record(self, stage: int, now: float, raw: int) -> None:
        if self._since[stage] is None:
            self._since[stage] = now
        samples = self._samples[stage]
        samples.append((now, raw))
        p = self.policies[stage]
        keep_from = now - max(p.up_delay_s, p.down_delay_s)
        while len(samples) > 1 and samples[1][0] <= keep_from:  # keep the one in force at keep_from
            samples.popleft()

    def decide(self, stage: int, current: int, backlog: int, now: float) -> Decision:
        """The replica count ``stage`` should run now, given ``current`` replicas and its ``backlog``."""
        p = self.policies[stage]
        raw = self.raw(stage, backlog)
        self._record(stage, now, raw)
        if current < p.min_replicas:
            return Decision(stage, current, p.min_replicas, f"below the minimum of {p.min_replicas}", backlog)
        if current > p.max_replicas:
            return Decision(stage, current, p.max_replicas, f"above the maximum of {p.max_replicas}", backlog)
        if current == 0 and backlog > p.activation:
            up = self._window(stage, now, p.up_delay_s)
            wanted = max(1, min(up) if up else 1)
            return Decision(
                stage, 0, wanted, f"activation: {backlog} entries wait and no replica runs", backlog
            )
        up = self._window(stage, now, p.up_delay_s)
        if up is not None and min(up) > current:
            return Decision(
                stage,
                current,
                min(up),
                f"backlog {backlog} > {p.target:g} per replica for {p.up_delay_s:g} s",
                backlog,
            )
        down = self._window(stage, now, p.down_delay_s)
        if down is not None and max(down) < current:
            why = (
                f"idle for {p.down_delay_s:g} s"
                if max(down) == 0
                else f"backlog needed at most {max(down)} replica(s) for {p.down_delay_s:g} s"
            )
            return Decision(stage, current, max(down), why, backlog)
        return Decision(stage, current, current, "steady", backlog)
