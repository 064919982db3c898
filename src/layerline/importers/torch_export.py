"""PyTorch ``nn.Module`` -> ONNX, with the batch dimension kept dynamic and the result verified."""

from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from layerline.errors import ModelImportError
from layerline.importers._onnxio import check_model, name_batch_dim, save_model, set_metadata
from layerline.importers._quiet import quiet_loggers
from layerline.importers._verify import compare_outputs, run_onnx

__all__ = ["EXPORTERS", "from_torch", "import_torch"]

logger = logging.getLogger(__name__)

#: Exporters ``from_torch`` knows, in the order ``exporter="auto"`` tries them.
EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")
#: The dynamo exporter has no implementations below this opset (it converts down, and fails, if asked).
DYNAMO_MIN_OPSET = 18


def import_torch() -> Any:
    """The ``torch`` module, or a ModelImportError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise ModelImportError(
            f"importing PyTorch modules needs torch ({exc}); install with `pip install 'layerline[torch]'`"
        ) from exc
    return torch


def _quiet() -> contextlib.AbstractContextManager[None]:
    return quiet_loggers("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


def _as_tensors(torch: Any, example_inputs: Any) -> tuple[Any, ...]:
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    tensors = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
        if not isinstance(item, torch.Tensor):
            raise ModelImportError(
                f"example input {i} is a {type(item).__name__}; from_torch takes a tensor or a tuple of "
                "tensors (numpy arrays are accepted too), one per positional argument of forward()"
            )
        tensors.append(item.detach())
    if not tensors:
        raise ModelImportError(
            "from_torch needs at least one example input (a tensor per forward() argument)"
        )
    return tuple(tensors)


def _flat_outputs(torch: Any, outputs: Any) -> list[Any]:
    items = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    if not all(isinstance(o, torch.Tensor) for o in items):
        kinds = ", ".join(type(o).__name__ for o in items)
        raise ModelImportError(
            f"the module returned ({kinds}); from_torch supports modules returning a tensor or a tuple of "
            "tensors: wrap it in a module whose forward() returns those"
        )
    return list(items)


def _default_input_names(module: Any, count: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count and len(set(params[:count])) == count:
        return params[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _check_names(kind: str, names: Sequence[str], count: int) -> list[str]:
    names = list(names)
    if len(names) != count or len(set(names)) != count or not all(isinstance(n, str) and n for n in names):
        raise ModelImportError(f"{kind} must be {count} distinct non-empty strings, got {names!r}")
    return names


def _resize_batch(torch: Any, tensors: Sequence[Any], batch: int) -> tuple[Any, ...]:
    """The same inputs with ``batch`` rows: rows repeated cyclically, floating-point repeats scaled by 0.9
    (zeros, signs and infinities kept) so that a model mixing up rows cannot pass verification."""
    out = []
    for t in tensors:
        rows = t.shape[0]
        index = torch.arange(batch) % rows
        resized = t.index_select(0, index).contiguous()
        if t.is_floating_point() and batch > rows:
            resized[rows:] *= 0.9
        out.append(resized)
    return tuple(out)


def _export_dynamo(
    torch: Any,
    module: Any,
    args: tuple[Any, ...],
    names: tuple[list[str], list[str]],
    dynamic: bool,
    opset: int,
    folder: Path,
) -> onnx.ModelProto:
    input_names, output_names = names
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=max(opset, DYNAMO_MIN_OPSET),
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        verbose=False,
        optimize=True,
    )
    target = folder / "dynamo.onnx"
    program.save(str(target), external_data=True)
    return onnx.load(str(target), load_external_data=True)


def _export_torchscript(
    torch: Any,
    module: Any,
    args: tuple[Any, ...],
    names: tuple[list[str], list[str]],
    dynamic: bool,
    opset: int,
    folder: Path,
) -> onnx.ModelProto:
    input_names, output_names = names
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic else None
    target = folder / "torchscript.onnx"
    torch.onnx.export(
        module,
        args,
        str(target),
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
        verbose=False,
    )
    return onnx.load(str(target), load_external_data=True)


_EXPORT_FUNCTIONS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def from_torch(
    module: Any,
    example_inputs: Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
    path: str | Path | None = None,
    exporter: str = "auto",
    verify: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> onnx.ModelProto:
    """Export ``module`` to ONNX with weights inline; optionally also save it to ``path``.

    ``example_inputs`` is a tensor (or numpy array) or a tuple of them, one per positional argument of
    ``forward``; the module must return a tensor or a tuple of tensors. With ``dynamic_batch`` dimension 0
    of every input and output is the batch and is named ``batch`` in the model.

    ``exporter="auto"`` tries the dynamo exporter (``torch.export``; it emits opset >= 18 whatever
    ``opset`` says) and falls back to the TorchScript tracer (which honours ``opset``) if it raises or if
    its model does not reproduce the module. ``verify`` runs the ONNX model in onnxruntime at the example
    batch and at another batch size and compares with the module: ``max|onnx - torch| <= atol + rtol *
    max|torch|`` per output. The exporter used is recorded in ``metadata_props["layerline.exporter"]``.
    """
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise ModelImportError(
            f"from_torch takes a torch.nn.Module, got {type(module).__name__}; for a saved model file use "
            "layerline.importers.load_model(path)"
        )
    if exporter != "auto" and exporter not in EXPORTERS:
        raise ModelImportError(f"exporter must be 'auto' or one of {EXPORTERS}, got {exporter!r}")
    args = _as_tensors(torch, example_inputs)
    batch = int(args[0].shape[0]) if args[0].dim() else 0
    if dynamic_batch and any(t.dim() == 0 or t.shape[0] != batch for t in args):
        shapes = [tuple(t.shape) for t in args]
        raise ModelImportError(
            f"dynamic_batch needs dimension 0 of every example input to be the same batch size, got shapes "
            f"{shapes}; pass dynamic_batch=False to export fixed shapes"
        )

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            # Batch 1 examples invite exporters to specialise the batch dimension to 1: trace with 2 rows.
            if dynamic_batch and batch == 1:
                args = _resize_batch(torch, args, 2)
                batch = 2
            outputs = _flat_outputs(torch, module(*args))
        in_names = _check_names(
            "input_names", input_names or _default_input_names(module, len(args)), len(args)
        )
        default_out = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
        out_names = _check_names("output_names", output_names or default_out, len(outputs))
        checks = [(args, outputs)]
        if verify and dynamic_batch:
            other = _resize_batch(torch, args, batch + 1)
            with torch.no_grad():
                checks.append((other, _flat_outputs(torch, module(*other))))
        model = _export_with_fallback(
            torch,
            module,
            args,
            (in_names, out_names),
            dynamic_batch,
            opset,
            exporter,
            checks if verify else [],
            (rtol, atol),
        )
    finally:
        module.train(was_training)
    if path is not None:
        save_model(model, path)
    return model


def _export_with_fallback(
    torch: Any,
    module: Any,
    args: tuple[Any, ...],
    names: tuple[list[str], list[str]],
    dynamic: bool,
    opset: int,
    exporter: str,
    checks: list[tuple[tuple[Any, ...], list[Any]]],
    tolerance: tuple[float, float],
) -> onnx.ModelProto:
    failures: list[str] = []
    for name in EXPORTERS if exporter == "auto" else (exporter,):
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="layerline-export-") as folder, _quiet():
                model = _EXPORT_FUNCTIONS[name](torch, module, args, names, dynamic, opset, Path(folder))
            seconds = time.perf_counter() - start
            if dynamic:
                _require_dynamic_batch(model)
                name_batch_dim(model)
            check_model(model)
            for inputs, expected in checks:
                feeds = {n: t.numpy() for n, t in zip(names[0], inputs, strict=True)}
                compare_outputs(run_onnx(model, feeds), [e.numpy() for e in expected], names[1], *tolerance)
        except Exception as exc:  # any exporter failure is reported, and the next exporter tried
            failures.append(f"{name} exporter: {type(exc).__name__}: {_first_lines(str(exc))}")
            logger.info("the %s exporter failed (%s)", name, failures[-1])
            continue
        set_metadata(
            model,
            [
                ("layerline.source", "torch"),
                ("layerline.exporter", f"torch.onnx.export(dynamo={name == 'dynamo'})"),
                ("layerline.torch_version", str(torch.__version__)),
                ("layerline.export_seconds", f"{seconds:.2f}"),
                ("layerline.verified", "true" if checks else "false"),
            ],
        )
        model.producer_name = model.producer_name or "pytorch"
        logger.info("exported %s with the %s exporter in %.2f s", type(module).__name__, name, seconds)
        return model
    raise ModelImportError(
        f"could not export {type(module).__name__} to ONNX:\n  "
        + "\n  ".join(failures)
        + "\nCommon causes: Python code that branches on tensor values or on the batch size, or forward() "
        "arguments that are not tensors. Try dynamic_batch=False, and see docs/importers.md"
    )


def _require_dynamic_batch(model: onnx.ModelProto) -> None:
    graph = model.graph
    fixed = [
        f"{v.name}={v.type.tensor_type.shape.dim[0].dim_value}"
        for v in (*graph.input, *graph.output)
        if v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].HasField("dim_value")
    ]
    if fixed:
        raise ModelImportError(
            f"the exporter fixed the batch dimension ({', '.join(fixed)}): the module's code depends on the "
            "batch size"
        )


def _first_lines(text: str, lines: int = 8) -> str:
    parts = text.strip().splitlines()
    return "\n    ".join(parts[:lines]) + ("\n    ..." if len(parts) > lines else "")
