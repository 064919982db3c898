"""onnxruntime sessions configured the way every stage (and every baseline) runs them."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

__all__ = ["open_session", "session_options"]


def session_options(threads: int = 1, exact: bool = False) -> ort.SessionOptions:
    """Options for one stage session.

    ``allow_spinning`` is off: several sessions share the cores of one machine, and spinning threads
    made them five times slower here. ``exact`` disables graph optimisations, so that no fusion changes the
    arithmetic and a chain of stages is bit-identical to the monolithic model run the same way.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = onnxruntime's default), got {threads}")
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    return opts


def open_session(model: str | Path | bytes, threads: int = 1, exact: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` (a path, or serialized ONNX bytes)."""
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(
        source, sess_options=session_options(threads, exact), providers=["CPUExecutionProvider"]
    )
