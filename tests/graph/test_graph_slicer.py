"""slice_model on tiny models: every block loads, chains of blocks and merged stages equal the model."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import graph_models as gm
import numpy as np
import onnx
import pytest
from onnx.external_data_helper import uses_external_data

from layerline.errors import SliceError
from layerline.graph import Manifest, slice_model, stage_forward_names
from layerline.graph import slicer as slicer_module
from layerline.runtime.inprocess import InProcessPipeline
from layerline.runtime.session import open_session
from layerline.runtime.stagespec import StageSpec
from layerline.tensors import TensorSpec

CASES = [(name, "layer") for name in gm.ALL_MODELS] + [
    ("chain_cnn", "op"),
    ("unet", "op"),
    ("transformer", "op"),
    ("if_model", "op"),
    ("shape_branch", "op"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{g}" for m, g in CASES])
def sliced(request, tmp_path_factory):
    name, granularity = request.param
    model = gm.ALL_MODELS[name]()
    out = tmp_path_factory.mktemp(f"{name}-{granularity}") / "sliced"
    manifest = slice_model(model, out, granularity=granularity)
    return model, out, manifest


def test_every_block_is_a_valid_standalone_model(sliced):
    model, out, manifest = sliced
    assert manifest.num_blocks >= 2
    for info in manifest.blocks:
        path = out / info.file
        onnx.checker.check_model(str(path), full_check=True)
        block = onnx.load(str(path))
        assert block.ir_version == model.ir_version
        assert [(o.domain, o.version) for o in block.opset_import] == [
            (o.domain, o.version) for o in model.opset_import
        ]
        session = open_session(path)
        assert [i.name for i in session.get_inputs()] == [s.name for s in info.inputs]
        assert [o.name for o in session.get_outputs()] == [s.name for s in info.outputs]
        assert info.num_nodes == sum(info.op_counts.values()) >= 1


def test_blocks_cover_the_model_once(sliced):
    model, _, manifest = sliced
    const_free = Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")
    assert sum((Counter(b.op_counts) for b in manifest.blocks), Counter()) == const_free
    assert [b.index for b in manifest.boundaries] == list(range(manifest.num_blocks + 1))
    assert manifest.boundaries[0].names == tuple(i.name for i in model.graph.input)
    assert manifest.boundaries[-1].names == tuple(o.name for o in model.graph.output)
    for k, info in enumerate(manifest.blocks):
        assert {s.name for s in info.inputs} <= set(manifest.boundaries[k].names)
        assert {s.name for s in info.outputs} <= set(manifest.boundaries[k + 1].names)
        assert (
            len(manifest.boundaries[k + 1].tensors) <= manifest.max_live_tensors
            or k + 1 == manifest.num_blocks
        )


@pytest.mark.parametrize("batch", [1, 3])
def test_block_chain_matches_monolithic(sliced, batch, tmp_path):
    model, out, manifest = sliced
    inputs = gm.feeds(model, batch)
    want = gm.run_monolithic(model, inputs, exact=False)
    got = gm.run_partition(out, manifest, gm.partitions(manifest.num_blocks)[0], inputs, False, tmp_path)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_stages_are_bit_exact_with_exact_sessions(sliced, batch, tmp_path):
    model, out, manifest = sliced
    inputs = gm.feeds(model, batch, seed=batch)
    want = gm.run_monolithic(model, inputs, exact=True)
    for parts in gm.partitions(manifest.num_blocks):
        got = gm.run_partition(out, manifest, parts, inputs, True, tmp_path)
        for name in want:
            assert got[name].dtype == want[name].dtype
            assert np.array_equal(got[name], want[name]), (parts, name)


def test_chain_cnn_manifest_is_hand_checked(tmp_path):
    manifest = slice_model(gm.chain_cnn(), tmp_path / "s")
    assert manifest.model_name == "chain_cnn" and manifest.source is None
    assert manifest.opset_imports == {"": gm.OPSET} and manifest.ir_version == gm.IR_VERSION
    assert manifest.inputs == (TensorSpec("x", "float32", ("batch", 3, 8, 8)),)
    assert manifest.outputs == (TensorSpec("logits", "float32", ("batch", 10)),)
    assert [b.op_counts for b in manifest.blocks] == [
        {"Conv": 1, "Relu": 1, "MaxPool": 1},
        {"Conv": 1, "Relu": 1, "MaxPool": 1, "Flatten": 1},
        {"Gemm": 1},
    ]
    # batch-1 bytes: x 3*8*8*4, pool1 4*4*4*4, flatten 32*4, logits 10*4
    assert [b.bytes_batch1 for b in manifest.boundaries] == [768, 256, 128, 40]
    assert [b.total_bytes_batch1 for b in manifest.boundaries] == [768, 256, 128, 40]
    assert [b.tensors[0].spec.shape for b in manifest.boundaries] == [
        ("batch", 3, 8, 8),
        ("batch", 4, 4, 4),
        ("batch", 32),
        ("batch", 10),
    ]
    # conv1: 2 * 256 outputs * 27 MACs + relu 256 + pool 64; conv2: 2 * 128 * 36 + 128 + 32 + 32; gemm 2*10*32
    assert [b.flops for b in manifest.blocks] == [14144, 9408, 640]
    # W1 4*3*3*3 + b1 4, W2 8*4*3*3 + b2 8, W3 10*32 + b3 10 float32s
    assert [b.weight_bytes for b in manifest.blocks] == [448, 1184, 1320]
    assert manifest.blocks[1].inputs == manifest.boundaries[1].specs
    assert all(b.data_file is None for b in manifest.blocks) and not manifest.external_data


def test_op_granularity_and_max_blocks(tmp_path):
    model = gm.chain_cnn()
    every = slice_model(model, tmp_path / "op", granularity="op")
    assert every.num_blocks == len(model.graph.node) == 8
    assert all(b.num_nodes == 1 for b in every.blocks)
    two = slice_model(model, tmp_path / "two", granularity="op", max_blocks=2)
    assert two.num_blocks == 2
    assert two.total_flops == every.total_flops
    # the most balanced split of [13824, 256, 64, 9216, 128, 32, 32, 640] flops puts conv1 alone
    assert [b.flops for b in two.blocks] == [13824, 10368]
    one = slice_model(model, tmp_path / "one", max_blocks=1)
    assert one.num_blocks == 1 and one.boundaries[1].names == ("logits",)


def test_skip_connections_are_in_every_boundary_they_cross(tmp_path):
    unet = slice_model(gm.unet(), tmp_path / "unet", granularity="op")
    crossing = [k for k, b in enumerate(unet.boundaries) if "e1" in b.names]
    assert len(crossing) >= 8
    assert crossing == list(range(crossing[0], crossing[-1] + 1))
    res = slice_model(gm.residual(), tmp_path / "res")
    assert max(len(b.tensors) for b in res.boundaries) == 2


def test_mask_input_is_forwarded_through_every_layer(tmp_path):
    model = gm.transformer()
    manifest = slice_model(model, tmp_path / "s")
    with_mask = [k for k, b in enumerate(manifest.boundaries) if "mask" in b.names]
    assert with_mask == list(range(len(with_mask)))
    assert len(with_mask) > manifest.num_blocks // 2
    # a block that does not read the mask passes it on
    passing = [b.index for b in manifest.blocks if "mask" in manifest.boundaries[b.index + 1].names]
    assert any("mask" in stage_forward_names(manifest, k, k + 1) for k in passing)
    # the sequence dimension is dynamic: recorded, with unknown bytes
    assert manifest.boundaries[1].tensors[0].spec.shape == ("batch", "seq", 8)
    assert manifest.boundaries[1].bytes_batch1 is None
    assert manifest.boundaries[-1].bytes_batch1 == 32
    # the Constant "scale" is copied into every block that uses it, and counted as its weight
    scale_blocks = [
        b
        for b in manifest.blocks
        if any(n.output[0] == "scale" for n in onnx.load(str(tmp_path / "s" / b.file)).graph.node)
    ]
    assert len(scale_blocks) == 2


def test_tied_weight_is_copied_into_both_blocks(tmp_path):
    manifest = slice_model(gm.tied(), tmp_path / "s")
    assert manifest.num_blocks == 4
    holders = [
        b.index
        for b in manifest.blocks
        if "W_tied" in {t.name for t in onnx.load(str(tmp_path / "s" / b.file)).graph.initializer}
    ]
    assert holders == [0, 3]
    assert all(b.weight_bytes == 6 * 6 * 4 for b in manifest.blocks)


def test_if_node_stays_whole_and_gets_outer_scope_tensors(tmp_path):
    model = gm.if_model()
    manifest = slice_model(model, tmp_path / "s", granularity="op")
    (holder,) = [b for b in manifest.blocks if "If" in b.op_counts]
    assert "h" in [s.name for s in holder.inputs]  # read only inside the branches
    block = onnx.load(str(tmp_path / "s" / holder.file))
    assert "Wt" in {t.name for t in block.graph.initializer}
    x = gm.feeds(model, 3)["x"]
    for sign in (1.0, -1.0):  # one sign takes each branch
        inputs = {"x": sign * x}
        want = gm.run_monolithic(model, inputs, exact=True)
        parts = gm.partitions(manifest.num_blocks)[0]
        got = gm.run_partition(tmp_path / "s", manifest, parts, inputs, True, tmp_path)
        assert np.array_equal(got["out"], want["out"])


def test_shape_side_branch_is_a_live_tensor(tmp_path):
    manifest = slice_model(gm.shape_branch(), tmp_path / "s")
    inner = manifest.boundaries[1]
    assert inner.names[0] == "newshape"
    assert inner.tensors[0].spec == TensorSpec("newshape", "int64", (2,))
    assert inner.tensors[0].bytes_batch1 == 16
    assert inner.bytes_batch1 == 16 + 4 * 4 * 4 * 4
    assert manifest.num_blocks == 2 and "newshape" in [s.name for s in manifest.blocks[1].inputs]
    ops = slice_model(gm.shape_branch(), tmp_path / "op", granularity="op")
    relu = [b.index for b in ops.blocks if b.op_counts == {"Relu": 1}]
    assert relu and all(stage_forward_names(ops, k, k + 1) == ("newshape",) for k in relu)


def test_in_process_pipeline_runs_the_blocks(tmp_path):
    model = gm.residual()
    out = tmp_path / "s"
    manifest = slice_model(model, out)
    specs = [
        StageSpec(b.index, str(out / b.file), stage_forward_names(manifest, b.index, b.index + 1), exact=True)
        for b in manifest.blocks
    ]
    inputs = gm.feeds(model, 2)

    async def go():
        pipeline = InProcessPipeline(specs)
        await pipeline.start()
        try:
            return await pipeline.infer(inputs, timeout_s=30)
        finally:
            await pipeline.close()

    result = asyncio.run(go())
    assert len(result.stages) == manifest.num_blocks
    assert np.array_equal(result.outputs["y"], gm.run_monolithic(model, inputs, exact=True)["y"])


def tensor_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """Save a copy of ``model`` with every initializer in ``weights.bin`` (onnx.save converts in place)."""
    path.parent.mkdir(parents=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)


def test_external_data_source_gives_external_blocks(tmp_path, monkeypatch):
    model = gm.unet()
    src = tmp_path / "src" / "unet.onnx"
    _save_external(model, src)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data is resolved relative to the model file, not the cwd
    out = tmp_path / "s"
    manifest = slice_model(src, out)
    assert manifest.external_data and manifest.source == "unet.onnx"
    in_memory = slice_model(model, tmp_path / "mem")
    assert manifest.boundaries == in_memory.boundaries  # shape inference saw the external scales
    assert [b.flops for b in manifest.blocks] == [b.flops for b in in_memory.blocks]
    assert [(d.file, d.source, d.link) for d in manifest.data_files] == [
        ("source_000.data", "weights.bin", "hardlink")
    ]
    assert (out / "source_000.data").samefile(src.parent / "weights.bin")
    external = set()
    for info in manifest.blocks:  # tensors of 1 KiB or more point into the shared file, smaller ones inline
        block = onnx.load(str(out / info.file), load_external_data=False)
        assert info.data_file is None
        for t in block.graph.initializer:
            assert uses_external_data(t) == (tensor_bytes(t) >= 1024), t.name
            if uses_external_data(t):
                external.add(t.name)
                assert t.external_data[0].value == "source_000.data"
    assert (
        len(external) == 3
    )  # the three conv weights of 8 output channels ("scales" is inline: ORT reads it)
    inputs = gm.feeds(model, 3)
    want = gm.run_monolithic(model, inputs, exact=True)
    for parts in gm.partitions(manifest.num_blocks):
        got = gm.run_partition(out, manifest, parts, inputs, True, tmp_path)
        assert np.array_equal(got["y"], want["y"])
    stage_data = tmp_path / f"stage_0_{manifest.num_blocks}.source_000.data"
    assert stage_data.samefile(src.parent / "weights.bin")
    assert not (tmp_path / f"stage_0_{manifest.num_blocks}.data").exists()


def test_model_file_without_external_data(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save_model(gm.chain_cnn(), str(path))
    manifest = slice_model(path, tmp_path / "s", name="renamed")
    assert manifest.source == "chain.onnx" and manifest.model_name == "renamed"
    assert not manifest.external_data


def test_weights_over_the_threshold_go_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(slicer_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = gm.chain_cnn()
    manifest = slice_model(model, tmp_path / "s")
    assert manifest.external_data
    assert [b.data_file is not None for b in manifest.blocks] == [False, True, True]  # block 0: all < 1 KiB
    inputs = gm.feeds(model, 1)
    got = gm.run_partition(tmp_path / "s", manifest, [(0, 3)], inputs, True, tmp_path)
    assert np.array_equal(got["logits"], gm.run_monolithic(model, inputs, exact=True)["logits"])


def test_in_memory_model_with_unresolved_external_data_is_refused(tmp_path):
    src = tmp_path / "src" / "m.onnx"
    _save_external(gm.chain_cnn(), src)
    with pytest.raises(SliceError, match="file path"):
        slice_model(onnx.load(str(src), load_external_data=False), tmp_path / "s")


def test_no_valid_cut_names_the_narrowest_point(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(SliceError) as info:
        slice_model(gm.shape_branch(), out, max_live_tensors=1)
    msg = str(info.value)
    assert "2 tensors are live [x, shape1]" in msg and "after node 0 (Shape" in msg
    assert "max_live_tensors=2" in msg and "static shapes" in msg
    assert not out.exists()
    assert slice_model(gm.shape_branch(), out, max_live_tensors=2).num_blocks >= 2


def test_single_node_model_cannot_be_cut(tmp_path):
    with pytest.raises(SliceError, match="nothing to cut"):
        slice_model(gm.single_node(), tmp_path / "s")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_live_tensors", 0),
        ("max_live_tensors", -1),
        ("max_live_tensors", 2.5),
        ("max_live_tensors", True),
        ("max_live_tensors", "4"),
        ("granularity", "layers"),
        ("max_blocks", 0),
    ],
)
def test_bad_options_are_refused(tmp_path, option, value):
    with pytest.raises(SliceError, match=option):
        slice_model(gm.chain_cnn(), tmp_path / "s", **{option: value})
    assert not (tmp_path / "s").exists()


def test_non_empty_out_dir_is_refused(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(SliceError, match="not empty"):
        slice_model(gm.chain_cnn(), out)
    with pytest.raises(SliceError, match=r"notes\.txt"):
        slice_model(gm.chain_cnn(), out, overwrite=True)
    assert keep.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SliceError, match="not a directory"):
        slice_model(gm.chain_cnn(), target)


def test_overwrite_replaces_a_previous_slice(tmp_path):
    out = tmp_path / "s"
    first = slice_model(gm.chain_cnn(), out, granularity="op")
    assert first.num_blocks == 8
    with pytest.raises(SliceError, match="overwrite=True"):
        slice_model(gm.chain_cnn(), out)
    second = slice_model(gm.chain_cnn(), out, overwrite=True)
    assert second.num_blocks == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(b.file for b in second.blocks)]
    )
    assert Manifest.load(out) == second


def test_ir3_model_with_initializers_listed_as_inputs(tmp_path):
    model = gm.chain_cnn()
    model.ir_version = 3
    model.opset_import[0].version = 9
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    manifest = slice_model(model, tmp_path / "s")
    assert manifest.inputs == (TensorSpec("x", "float32", ("batch", 3, 8, 8)),)
    assert manifest.boundaries[0].names == ("x",)
    inputs = {"x": gm.feeds(model, 2)["x"]}
    want = gm.run_monolithic(model, inputs, exact=True)["logits"]
    for parts in gm.partitions(manifest.num_blocks):
        got = gm.run_partition(tmp_path / "s", manifest, parts, inputs, True, tmp_path)
        assert np.array_equal(got["logits"], want)
