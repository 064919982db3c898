"""Merging block ranges into stage graphs, and the names a stage forwards."""

from __future__ import annotations

import graph_models as gm
import numpy as np
import onnx
import pytest

from layerline.errors import SliceError
from layerline.graph import build_stage_model, slice_model, stage_forward_names, write_stage_model
from layerline.graph import stage as stage_module
from layerline.runtime.session import open_session


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage") / "s"
    model = gm.transformer()
    return model, out, slice_model(model, out)


def _ranges(n: int) -> list[tuple[int, int]]:
    return [*[(a, b) for a in range(n) for b in range(a + 1, n + 1) if b - a >= 2][::3], (0, n)]


def test_stage_inputs_outputs_and_forward(transformer):
    _, out, manifest = transformer
    for start, stop in _ranges(manifest.num_blocks):
        merged = build_stage_model(out, start, stop)
        onnx.checker.check_model(merged, full_check=True)
        blocks = manifest.blocks[start:stop]
        produced = {s.name for b in blocks for s in b.outputs}
        consumed = [s.name for b in blocks for s in b.inputs]
        from_before = {n for n in consumed if n not in produced}
        assert {i.name for i in merged.graph.input} == from_before
        assert set(from_before) <= set(manifest.boundaries[start].names)
        outputs = [o.name for o in merged.graph.output]
        forward = stage_forward_names(manifest, start, stop)
        assert outputs + list(forward) == [n for n in manifest.boundaries[stop].names if n in outputs] + [
            n for n in manifest.boundaries[stop].names if n in forward
        ]
        assert set(outputs) | set(forward) == set(manifest.boundaries[stop].names)
        assert not set(outputs) & set(forward)
        assert set(forward) <= set(manifest.boundaries[start].names)


def test_merged_stage_runs_like_its_blocks(transformer, tmp_path):
    model, out, manifest = transformer
    n = manifest.num_blocks
    inputs = gm.feeds(model, 3)
    # run blocks [0, 3) one at a time, then compare the merged stage [3, n) fed the same boundary
    tensors = gm.run_partition(out, manifest, [(0, 1), (1, 2), (2, 3)], inputs, True, tmp_path)
    session = open_session(build_stage_model(out, 3, n).SerializeToString(), 1, True)
    names = [o.name for o in session.get_outputs()]
    got = session.run(names, {i.name: tensors[i.name] for i in session.get_inputs()})
    want = gm.run_monolithic(model, inputs, exact=True)
    assert names == ["pooled"] and np.array_equal(got[0], want["pooled"])


def test_shared_weights_and_constants_are_stored_once(transformer, tmp_path):
    _, out, manifest = transformer
    merged = build_stage_model(out, 0, manifest.num_blocks)
    scale_nodes = [n for n in merged.graph.node if "scale" in n.output]
    assert len(scale_nodes) == 1
    names = [t.name for t in merged.graph.initializer]
    assert len(names) == len(set(names))
    tied_dir = tmp_path / "tied"
    tied = slice_model(gm.tied(), tied_dir)
    whole = build_stage_model(tied_dir, 0, tied.num_blocks)
    assert [t.name for t in whole.graph.initializer].count("W_tied") == 1
    assert sum(b.weight_bytes for b in tied.blocks) == 4 * 6 * 6 * 4  # the tied weight counted twice
    assert sum(onnx.numpy_helper.to_array(t).nbytes for t in whole.graph.initializer) == 3 * 6 * 6 * 4


def test_write_stage_model_uses_external_data_when_big(tmp_path, monkeypatch):
    model = gm.chain_cnn()
    out = tmp_path / "s"
    manifest = slice_model(model, out)
    n = manifest.num_blocks
    small = write_stage_model(out, 0, n, tmp_path / "small.onnx")
    assert not (tmp_path / "small.data").exists()
    monkeypatch.setattr(stage_module, "EXTERNAL_DATA_THRESHOLD", 100)
    sizes = []
    for _ in range(2):  # a second write replaces the data file instead of appending to it
        big = write_stage_model(out, 0, n, tmp_path / "sub" / "big.onnx")
        sizes.append((tmp_path / "sub" / "big.data").stat().st_size)
    assert sizes[0] == sizes[1] >= 1152 + 1280  # the two weights of 1 KiB or more: W2 and W3
    assert onnx.load(str(big), load_external_data=False).ByteSize() < small.stat().st_size - 2000
    inputs = gm.feeds(model, 2)
    want = gm.run_monolithic(model, inputs, exact=True)["logits"]
    for path in (small, big):
        session = open_session(path, 1, True)
        assert np.array_equal(session.run(["logits"], inputs)[0], want)


def test_bad_ranges_and_targets(transformer):
    _, out, manifest = transformer
    n = manifest.num_blocks
    for start, stop in [(1, 1), (2, 1), (-1, 2), (0, n + 1)]:
        with pytest.raises(SliceError, match=r"0 <= start < stop"):
            build_stage_model(out, start, stop)
        with pytest.raises(SliceError, match=r"0 <= start < stop"):
            stage_forward_names(manifest, start, stop)
    with pytest.raises(SliceError, match="overwrite a block file"):
        write_stage_model(out, 0, 2, out / manifest.blocks[0].file)
    assert onnx.load(str(out / manifest.blocks[0].file)).graph.node
