"""Tensor descriptions shared by the manifest, the runtime and the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Dim", "TensorSpec"]

#: A dimension: a fixed size, or a symbolic name (``"batch"``) for a dynamic one.
Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type (a numpy dtype name such as ``"float32"``) and shape of one tensor.

    Dynamic dimensions are strings (their symbolic name, or ``"?"`` when the model gives none).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def concrete_shape(self, batch: int = 1) -> tuple[int, ...] | None:
        """The shape with the leading dynamic dimension set to ``batch``; None if other dims are dynamic."""
        dims: list[int] = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                dims.append(d)
            elif i == 0:
                dims.append(batch)
            else:
                return None
        return tuple(dims)

    def nbytes(self, batch: int = 1) -> int | None:
        """Bytes of this tensor at the given batch size, or None when a non-batch dim is dynamic."""
        shape = self.concrete_shape(batch)
        if shape is None:
            return None
        return int(np.prod(shape, dtype=np.int64)) * self.numpy_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))
