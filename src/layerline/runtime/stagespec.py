"""What one stage runs: its ONNX file and the received tensors it passes on unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["StageSpec"]


@dataclass(frozen=True)
class StageSpec:
    """One stage of a deployment.

    ``model_path``: the stage's merged ONNX graph. Its inputs are taken from the received frame by name.
    ``forward``: names of received tensors that later stages (or the model's outputs) still need; they are
    sent on unchanged next to the session's outputs, without passing through onnxruntime.
    """

    index: int
    model_path: str
    forward: tuple[str, ...] = ()
    threads: int = 1
    exact: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "model_path": self.model_path,
            "forward": list(self.forward),
            "threads": self.threads,
            "exact": self.exact,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageSpec:
        return cls(
            index=int(data["index"]),
            model_path=str(data["model_path"]),
            forward=tuple(data.get("forward", ())),
            threads=int(data.get("threads", 1)),
            exact=bool(data.get("exact", False)),
        )
