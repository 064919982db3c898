"""The manifest format: JSON round trip and the errors on a missing, corrupt or foreign manifest."""

from __future__ import annotations

import json

import graph_models as gm
import pytest

from layerline.errors import FormatError
from layerline.graph import FORMAT, FORMAT_VERSION, MANIFEST_FILE, Manifest, slice_model


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "s"
    return out, slice_model(gm.transformer(), out)


def test_round_trip(sliced):
    out, manifest = sliced
    data = manifest.to_json()
    assert data["format"] == FORMAT and data["format_version"] == FORMAT_VERSION
    assert Manifest.from_json(json.loads(json.dumps(data))) == manifest
    assert Manifest.load(out) == manifest
    assert Manifest.load(out / MANIFEST_FILE) == manifest


def test_json_fields(sliced):
    out, manifest = sliced
    data = json.loads((out / MANIFEST_FILE).read_text())
    assert data == manifest.to_json()
    assert data["inputs"][1] == {"name": "mask", "dtype": "float32", "shape": ["batch", "seq", "seq"]}
    assert data["opset_imports"] == {"": gm.OPSET}
    assert data["data_files"] == [] and not data["external_data"]  # an in-memory model embeds its weights
    assert len(data["boundaries"]) == len(data["blocks"]) + 1
    first = data["boundaries"][0]
    assert first["bytes_batch1"] is None and all(t["bytes_batch1"] is None for t in first["tensors"])
    assert data["boundaries"][-1]["tensors"] == [
        {"name": "pooled", "dtype": "float32", "shape": ["batch", 8], "bytes_batch1": 32}
    ]
    block = data["blocks"][0]
    assert set(block) == {
        "index",
        "file",
        "data_file",
        "inputs",
        "outputs",
        "weight_bytes",
        "op_counts",
        "flops",
        "num_nodes",
    }
    assert block["file"] == "block_000.onnx" and (out / block["file"]).is_file()


def test_missing_manifest(tmp_path):
    with pytest.raises(FormatError, match=r"no manifest at .*manifest\.json.*layerline slice"):
        Manifest.load(tmp_path)
    with pytest.raises(FormatError, match="no manifest"):
        Manifest.load(tmp_path / "absent")


def _write(tmp_path, text: str):
    (tmp_path / MANIFEST_FILE).write_text(text)
    return tmp_path


def test_corrupt_json(tmp_path):
    with pytest.raises(FormatError, match=r"cannot read manifest .*manifest\.json.*re-run"):
        Manifest.load(_write(tmp_path, '{"format": "layerline.sliced", '))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "something.else"}, "not a layerline sliced model manifest"),
        ({"format_version": 99}, "format_version 99 is not supported"),
        ({"blocks": "nope"}, "malformed manifest"),
        ({"boundaries": []}, "malformed manifest"),
    ],
)
def test_wrong_format_version_or_fields(sliced, tmp_path, change, match):
    _, manifest = sliced
    data = {**manifest.to_json(), **change}
    with pytest.raises(FormatError, match=match) as info:
        Manifest.load(_write(tmp_path, json.dumps(data)))
    assert str(tmp_path) in str(info.value)


def test_missing_field(sliced, tmp_path):
    _, manifest = sliced
    data = manifest.to_json()
    del data["blocks"][0]["flops"]
    with pytest.raises(FormatError, match="flops"):
        Manifest.load(_write(tmp_path, json.dumps(data)))
    with pytest.raises(FormatError, match="JSON object"):
        Manifest.from_json([1, 2])


def test_public_surface():
    import layerline.graph as graph

    assert {
        "slice_model",
        "Manifest",
        "BlockInfo",
        "Boundary",
        "build_stage_model",
        "write_stage_model",
        "stage_forward_names",
        "analyze_graph",
        "live_sets",
        "topological_order",
    } <= set(graph.__all__)
    assert all(hasattr(graph, name) for name in graph.__all__)
