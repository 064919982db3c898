"""Run an imported model in onnxruntime and compare it with the framework's own outputs."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from layerline.errors import ModelImportError
from layerline.importers._onnxio import needs_external_data, save_model
from layerline.runtime.session import open_session

__all__ = ["compare_outputs", "run_onnx"]


def run_onnx(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` for ``feeds`` (onnxruntime, default threads, full optimisations)."""
    if needs_external_data(model):
        # Too big to serialise in memory: onnxruntime reads it from a file with external data.
        with tempfile.TemporaryDirectory(prefix="layerline-verify-") as folder:
            session = open_session(save_model(model, Path(folder) / "model.onnx"), threads=0)
            return session.run(None, dict(feeds))
    session = open_session(model.SerializeToString(), threads=0)
    return session.run(None, dict(feeds))


def compare_outputs(
    actual: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    names: Sequence[str],
    rtol: float,
    atol: float,
) -> None:
    """Raise ModelImportError unless every output matches: ``max|a - e| <= atol + rtol * max|e|``."""
    if len(actual) != len(expected):
        raise ModelImportError(f"the ONNX model has {len(actual)} outputs, the original {len(expected)}")
    for name, a, e in zip(names, actual, expected, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape:
            raise ModelImportError(f"output {name!r}: ONNX shape {a.shape} but the original gives {e.shape}")
        if a.dtype.kind in "fc" or e.dtype.kind in "fc":
            err = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)), initial=0.0))
            bound = atol + rtol * float(np.max(np.abs(e), initial=0.0))
            if not err <= bound:  # (NaN fails too)
                raise ModelImportError(
                    f"output {name!r} at batch {a.shape[0] if a.ndim else 1}: ONNX differs from the original "
                    f"by up to {err:.3g} (allowed {bound:.3g})"
                )
        elif not np.array_equal(a, e):
            raise ModelImportError(f"output {name!r}: ONNX values differ from the original's")
