"""The manifest of a sliced model: ``manifest.json`` next to the block files.

A sliced directory holds ``manifest.json`` and one ``block_NNN.onnx`` per block; when weights are stored as
ONNX external data, also ``source_NNN.data`` (hard links to the source model's data files, which the
blocks reference) or ``block_NNN.data`` (per-block copies, for an in-memory model over 2 GB). The manifest
describes every block and every boundary (the live tensors crossing each cut) and the shared data files;
``docs/manifest.md`` documents each field and its unit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerline.errors import FormatError
from layerline.graph.extdata import DataFile, check_data_files
from layerline.tensors import TensorSpec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "BlockInfo",
    "Boundary",
    "BoundaryTensor",
    "Manifest",
]

log = logging.getLogger(__name__)

FORMAT = "layerline.sliced"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

_FIX = "re-run `layerline slice` (slice_model) to write a fresh sliced directory"


def _specs(data: Any) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(d) for d in data)


@dataclass(frozen=True)
class BoundaryTensor:
    """One tensor crossing a cut; ``bytes_batch1`` is None when a non-batch dimension is dynamic."""

    spec: TensorSpec
    bytes_batch1: int | None

    def to_json(self) -> dict[str, Any]:
        return {**self.spec.to_json(), "bytes_batch1": self.bytes_batch1}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BoundaryTensor:
        b = data["bytes_batch1"]
        return cls(TensorSpec.from_json(data), None if b is None else int(b))


@dataclass(frozen=True)
class Boundary:
    """The live tensor set at cut ``index`` (0: the model inputs, num_blocks: the model outputs).

    ``bytes_batch1`` is the total at batch 1, or None when any tensor's size is unknown.
    """

    index: int
    tensors: tuple[BoundaryTensor, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.spec.name for t in self.tensors)

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.spec for t in self.tensors)

    @property
    def bytes_batch1(self) -> int | None:
        sizes = [t.bytes_batch1 for t in self.tensors]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @property
    def total_bytes_batch1(self) -> int | None:
        """Alias of :attr:`bytes_batch1` (the JSON key of the total)."""
        return self.bytes_batch1

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tensors": [t.to_json() for t in self.tensors],
            "bytes_batch1": self.bytes_batch1,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Boundary:
        return cls(int(data["index"]), tuple(BoundaryTensor.from_json(t) for t in data["tensors"]))


@dataclass(frozen=True)
class BlockInfo:
    """One block: its file, the live tensors it consumes and produces, and its cost estimates.

    ``inputs``: tensors its nodes consume that come from before it. ``outputs``: tensors it produces that a
    later block or the model's outputs need. ``weight_bytes``: bytes of the initializers and constants in its
    file (shared weights are counted in every block holding a copy). ``flops``: estimated at batch 1.
    ``op_counts`` and ``num_nodes`` count the block's own nodes, not the constant nodes copied into it.
    """

    index: int
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_bytes: int
    op_counts: dict[str, int]
    flops: int
    num_nodes: int
    data_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "file": self.file,
            "data_file": self.data_file,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "weight_bytes": self.weight_bytes,
            "op_counts": dict(self.op_counts),
            "flops": self.flops,
            "num_nodes": self.num_nodes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockInfo:
        return cls(
            index=int(data["index"]),
            file=str(data["file"]),
            data_file=None if data.get("data_file") is None else str(data["data_file"]),
            inputs=_specs(data["inputs"]),
            outputs=_specs(data["outputs"]),
            weight_bytes=int(data["weight_bytes"]),
            op_counts={str(k): int(v) for k, v in data["op_counts"].items()},
            flops=int(data["flops"]),
            num_nodes=int(data["num_nodes"]),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything a planner and a runtime need to know about a sliced model, without opening the blocks.

    ``opset_imports`` maps an opset domain (``""`` is the default ONNX domain) to its version.
    ``boundaries`` has ``num_blocks + 1`` entries; block ``k`` runs between ``boundaries[k]`` and
    ``boundaries[k + 1]``. ``data_files``: the external data files, shared by the blocks, that the
    blocks' tensors reference by name (empty when blocks embed their weights or have their own ``data_file``).
    """

    model_name: str
    source: str | None
    ir_version: int
    opset_imports: dict[str, int]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    blocks: tuple[BlockInfo, ...]
    boundaries: tuple[Boundary, ...]
    max_live_tensors: int = 4
    granularity: str = "layer"
    external_data: bool = False
    data_files: tuple[DataFile, ...] = ()
    format: str = field(default=FORMAT)
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        if len(self.boundaries) != len(self.blocks) + 1:
            raise ValueError(
                f"{len(self.boundaries)} boundaries for {len(self.blocks)} blocks (need one more)"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def total_flops(self) -> int:
        return sum(b.flops for b in self.blocks)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_version": self.format_version,
            "model_name": self.model_name,
            "source": self.source,
            "ir_version": self.ir_version,
            "opset_imports": dict(self.opset_imports),
            "max_live_tensors": self.max_live_tensors,
            "granularity": self.granularity,
            "external_data": self.external_data,
            "data_files": [d.to_json() for d in self.data_files],
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "blocks": [b.to_json() for b in self.blocks],
            "boundaries": [b.to_json() for b in self.boundaries],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Parse a manifest; raises FormatError on another format or version, or a missing/bad field."""
        if not isinstance(data, dict):
            raise FormatError(f"a manifest is a JSON object, got {type(data).__name__}; {_FIX}")
        if data.get("format") != FORMAT:
            raise FormatError(
                f"not a layerline sliced model manifest (format={data.get('format')!r}); {_FIX}"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"manifest format_version {data.get('format_version')!r} is not supported "
                f"(this layerline reads version {FORMAT_VERSION}); {_FIX}"
            )
        try:
            blocks = tuple(BlockInfo.from_json(b) for b in data["blocks"])
            boundaries = tuple(Boundary.from_json(b) for b in data["boundaries"])
            manifest = cls(
                model_name=str(data["model_name"]),
                source=None if data.get("source") is None else str(data["source"]),
                ir_version=int(data["ir_version"]),
                opset_imports={str(k): int(v) for k, v in data["opset_imports"].items()},
                inputs=_specs(data["inputs"]),
                outputs=_specs(data["outputs"]),
                blocks=blocks,
                boundaries=boundaries,
                max_live_tensors=int(data.get("max_live_tensors", 4)),
                granularity=str(data.get("granularity", "layer")),
                external_data=bool(data.get("external_data", False)),
                data_files=tuple(DataFile.from_json(d) for d in data.get("data_files", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"malformed manifest ({type(exc).__name__}: {exc}); {_FIX}") from exc
        for i, b in enumerate(manifest.blocks):
            if b.index != i:
                raise FormatError(f"malformed manifest: block {i} has index {b.index}; {_FIX}")
        return manifest

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` into ``directory``; returns its path."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read ``manifest.json`` from a sliced directory (or the manifest file itself).

        Also checks that the external data files the blocks reference are there and unchanged since
        slicing (FormatError naming the file otherwise).
        """
        path = Path(directory)
        if path.is_dir() or not path.name.endswith(".json"):
            path = path / MANIFEST_FILE
        if not path.is_file():
            raise FormatError(
                f"no manifest at {path}: is {path.parent} a sliced model directory? "
                "Run `layerline slice MODEL -o DIR` (slice_model) to create one"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"cannot read manifest {path}: {exc}; {_FIX}") from exc
        try:
            manifest = cls.from_json(data)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from exc
        check_data_files(path.parent, manifest.data_files)
        return manifest
