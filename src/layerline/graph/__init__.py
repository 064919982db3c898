"""The ``slice`` step: cut an ONNX model into ordered blocks, describe them in a manifest, merge stages.

``slice_model`` writes a sliced directory (``docs/manifest.md``); ``Manifest.load`` reads it back;
``build_stage_model`` / ``write_stage_model`` merge a contiguous block range into one stage graph and
``stage_forward_names`` says which received tensors that stage passes on untouched. A model whose weights
are ONNX external data is sliced without copying them (``layerline.graph.extdata``).
"""

from __future__ import annotations

from layerline.graph.cost import HEAVY_OPS, is_heavy, node_flops
from layerline.graph.cuts import choose_cuts
from layerline.graph.extdata import DataFile
from layerline.graph.liveness import GraphAnalysis, analyze_graph, live_sets, topological_order
from layerline.graph.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    BlockInfo,
    Boundary,
    BoundaryTensor,
    Manifest,
)
from layerline.graph.slicer import slice_model
from layerline.graph.stage import build_stage_model, stage_forward_names, write_stage_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HEAVY_OPS",
    "MANIFEST_FILE",
    "BlockInfo",
    "Boundary",
    "BoundaryTensor",
    "DataFile",
    "GraphAnalysis",
    "Manifest",
    "analyze_graph",
    "build_stage_model",
    "choose_cuts",
    "is_heavy",
    "live_sets",
    "node_flops",
    "slice_model",
    "stage_forward_names",
    "topological_order",
    "write_stage_model",
]
