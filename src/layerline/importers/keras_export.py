"""Keras 3 models (``.keras`` / ``.h5`` files or live models) -> ONNX, through Keras' torch backend."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from layerline.errors import ModelImportError
from layerline.importers._onnxio import check_model, name_batch_dim, rename_tensor, save_model, set_metadata
from layerline.importers._quiet import quiet_loggers
from layerline.importers._verify import compare_outputs, run_onnx

__all__ = ["KERAS_SUFFIXES", "from_keras", "import_keras"]

logger = logging.getLogger(__name__)

KERAS_SUFFIXES: tuple[str, ...] = (".keras", ".h5", ".hdf5")
_INSTALL = "install with `pip install 'layerline[keras]'`"


def import_keras() -> Any:
    """The ``keras`` module running on the torch backend (``KERAS_BACKEND=torch`` is set if unset).

    Keras fixes its backend when first imported: if it was already imported with another backend, or the
    environment asks for another one, this raises ModelImportError rather than exporting with the wrong one.
    """
    requested = os.environ.get("KERAS_BACKEND")
    if "keras" not in sys.modules:
        if requested not in (None, "", "torch"):
            raise ModelImportError(
                f"KERAS_BACKEND={requested}, but layerline converts Keras models through the torch backend; "
                "run with KERAS_BACKEND=torch (or unset it)"
            )
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as exc:
        raise ModelImportError(f"importing Keras models needs keras and torch ({exc}); {_INSTALL}") from exc
    backend = keras.backend.backend()
    if backend != "torch":
        raise ModelImportError(
            f"keras was already imported with the {backend!r} backend; layerline needs the torch backend: "
            "set KERAS_BACKEND=torch before anything imports keras (e.g. in the environment)"
        )
    return keras


def _quiet() -> contextlib.AbstractContextManager[None]:
    return quiet_loggers("torch.onnx", "absl", "onnxscript", "onnx_ir")


def _load(keras: Any, source: str | os.PathLike[str]) -> Any:
    path = Path(source)
    if not path.is_file():
        raise ModelImportError(f"{path}: no such file (expected a Keras model saved as .keras or .h5)")
    if path.suffix.lower() not in KERAS_SUFFIXES:
        raise ModelImportError(f"{path}: a Keras model file ends in {', '.join(KERAS_SUFFIXES)}")
    try:
        with _quiet():
            return keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise ModelImportError(f"{path}: Keras could not load it: {type(exc).__name__}: {exc}") from exc


def _input_specs(model: Any) -> list[tuple[str, tuple[int | None, ...], str]]:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ModelImportError(
            f"the Keras model {model.name!r} has no defined inputs; build it with keras.Input(shape=...) "
            "(or call it once on data) before converting"
        )
    specs = []
    for i, tensor in enumerate(inputs):
        name = getattr(tensor, "name", None) or f"input_{i}"
        specs.append((name, tuple(tensor.shape), str(tensor.dtype)))
    return specs


def _sample(specs: list[tuple[str, tuple[int | None, ...], str]], batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for name, shape, dtype in specs:
        if any(d is None for d in shape[1:]):
            raise ModelImportError(
                f"input {name!r} has shape {shape}: only the batch dimension may be unknown; give the other "
                "dimensions fixed sizes in keras.Input"
            )
        concrete = (batch, *shape[1:])
        if np.dtype(dtype).kind == "f":
            arrays.append(rng.standard_normal(concrete).astype(dtype))
        else:
            arrays.append(np.zeros(concrete, dtype=dtype))
    return arrays


def _output_names(model: Any, count: int) -> list[str]:
    names = getattr(model, "output_names", None)
    if isinstance(names, (list, tuple)) and len(names) == count and len(set(names)) == count:
        return [str(n) for n in names]
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _predict(model: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    out = model.predict(arrays if len(arrays) > 1 else arrays[0], verbose=0)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def from_keras(
    path_or_model: Any,
    *,
    path: str | Path | None = None,
    opset: int = 17,
    verify: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> onnx.ModelProto:
    """Convert a Keras 3 model (a ``.keras``/``.h5`` file or a ``keras.Model``) to ONNX.

    Uses ``model.export(format="onnx")`` on the torch backend, which keeps an unknown (``None``) batch size
    dynamic; it is named ``batch``. Graph inputs keep the names of the model's ``keras.Input`` tensors and
    outputs take the model's output names. With ``verify`` the ONNX model is run at batch 1 and 3 and
    compared with ``model.predict`` (``max|onnx - keras| <= atol + rtol * max|keras|``). Saves to ``path``
    when given. Every failure is a ModelImportError naming the cause.
    """
    keras = import_keras()
    model = _load(keras, path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    if not isinstance(model, keras.Model):
        raise ModelImportError(
            f"from_keras takes a keras.Model or the path of a .keras/.h5 file, got {type(model).__name__}"
        )
    specs = _input_specs(model)
    dynamic = all(shape and shape[0] is None for _, shape, _ in specs)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="layerline-keras-") as folder, _quiet():
            if not getattr(model, "_called", True):
                # Keras refuses to export a model that was loaded but never called.
                sample = _sample(specs, 1, 0)
                model(sample if len(sample) > 1 else sample[0], training=False)
            target = Path(folder) / "model.onnx"
            model.export(str(target), format="onnx", verbose=False, opset_version=opset)
            onnx_model = onnx.load(str(target), load_external_data=True)
    except ModelImportError:
        raise
    except Exception as exc:
        raise ModelImportError(
            f"Keras could not export {model.name!r} to ONNX: {type(exc).__name__}: {exc}"
        ) from exc
    seconds = time.perf_counter() - start

    graph = onnx_model.graph
    for output, name in zip(list(graph.output), _output_names(model, len(graph.output)), strict=True):
        taken = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
        if name not in taken:
            rename_tensor(graph, output.name, name)
    if dynamic:
        name_batch_dim(onnx_model)
    try:
        check_model(onnx_model)
    except Exception as exc:
        raise ModelImportError(f"the ONNX model exported from {model.name!r} is invalid: {exc}") from exc
    if verify:
        names = [i.name for i in graph.input]
        for batch in (1, 3) if dynamic else (specs[0][1][0],):
            arrays = _sample(specs, batch, batch)
            compare_outputs(
                run_onnx(onnx_model, dict(zip(names, arrays, strict=True))),
                _predict(model, arrays),
                [o.name for o in graph.output],
                rtol,
                atol,
            )
    set_metadata(
        onnx_model,
        [
            ("layerline.source", "keras"),
            ("layerline.exporter", "keras.Model.export(format='onnx') on the torch backend"),
            ("layerline.keras_version", str(keras.__version__)),
            ("layerline.export_seconds", f"{seconds:.2f}"),
            ("layerline.verified", "true" if verify else "false"),
        ],
    )
    logger.info("converted Keras model %r in %.2f s", model.name, seconds)
    if path is not None:
        save_model(onnx_model, path)
    return onnx_model
