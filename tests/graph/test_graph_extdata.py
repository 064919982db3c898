"""Models whose weights are ONNX external data: sliced without copying them, and checked when loaded."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import graph_models as gm
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from layerline.errors import FormatError, SliceError
from layerline.graph import MANIFEST_FILE, Manifest, build_stage_model, slice_model, write_stage_model
from layerline.runtime.session import open_session

FEW_KB = 4096


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    """Save a copy of ``model`` with every tensor in ``w.data`` next to it; returns the data file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.data",
        size_threshold=0,
    )
    return path.parent / "w.data"


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return gm.transformer(layers=2, d=32)


@pytest.fixture
def sliced(model, tmp_path):
    src = tmp_path / "model" / "m.onnx"
    data = _save_external(model, src)
    out = tmp_path / "sliced"
    return src, data, out, slice_model(src, out)


@pytest.fixture
def other_fs(tmp_path):
    """A directory on another filesystem than ``tmp_path`` (tmpfs), where hard links cannot reach."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary directory")
    path = Path(tempfile.mkdtemp(dir=shm, prefix="layerline-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _assert_runs_like(model, out: Path, manifest: Manifest, workdir: Path) -> None:
    """Every block alone, the whole range merged and halves merged equal the monolithic model."""
    inputs = gm.feeds(model, 2)
    want = gm.run_monolithic(model, inputs, exact=True)["pooled"]
    workdir.mkdir(parents=True, exist_ok=True)
    for parts in gm.partitions(manifest.num_blocks):
        got = gm.run_partition(out, manifest, parts, inputs, True, workdir)
        assert np.array_equal(got["pooled"], want)


def _external_entries(path: Path) -> dict[str, dict[str, str]]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data}
        for t in proto.graph.initializer
        if uses_external_data(t)
    }


def test_blocks_reference_the_source_data_without_copying(model, sliced, tmp_path):
    src, data, out, manifest = sliced
    assert data.stat().st_size > 60_000
    assert manifest.external_data
    (record,) = manifest.data_files
    st = data.stat()
    assert (record.file, record.source, record.link) == ("source_000.data", "w.data", "hardlink")
    assert (record.size_bytes, record.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert all(b.data_file is None for b in manifest.blocks)
    for f in set(out.iterdir()) - {out / MANIFEST_FILE}:  # nothing big but the hard link: no weight copied
        assert f.stat().st_size <= FEW_KB or (f.samefile(data) and f.stat().st_nlink >= 2), f.name
    assert sorted(f.name for f in out.iterdir() if f.suffix == ".data") == ["source_000.data"]
    source_entries = _external_entries(src)
    referenced = {}
    for info in manifest.blocks:
        for name, entry in _external_entries(out / info.file).items():
            assert entry["location"] == "source_000.data"
            assert (entry["offset"], entry["length"]) == (
                source_entries[name]["offset"],
                source_entries[name]["length"],
            )
            referenced[name] = int(entry["length"])
    assert sum(referenced.values()) > 0.95 * st.st_size  # all the big weights are referenced
    stages = tmp_path / "stages"
    _assert_runs_like(model, out, manifest, stages)
    links = sorted(stages.glob("*.data"))
    assert links and all(f.samefile(data) for f in links)
    assert all(f.stat().st_size <= 2 * FEW_KB for f in stages.glob("*.onnx"))  # graphs, no weights


def test_stage_runs_from_another_directory(model, sliced, tmp_path, monkeypatch):
    _, data, out, manifest = sliced
    n = manifest.num_blocks
    inputs = gm.feeds(model, 3)
    want = gm.run_monolithic(model, inputs, exact=True)["pooled"]
    stage_dir = tmp_path / "home" / "deployments" / "demo" / "stages"
    for _ in range(2):  # a second write replaces the link
        path = write_stage_model(out, 0, n, stage_dir / "stage0.onnx")
    assert sorted(f.name for f in stage_dir.iterdir()) == ["stage0.onnx", "stage0.source_000.data"]
    assert (stage_dir / "stage0.source_000.data").samefile(data)
    monkeypatch.chdir(tmp_path / "model")  # locations resolve against the stage file, not the cwd
    assert np.array_equal(open_session(path, 1, True).run(["pooled"], inputs)[0], want)
    # a stage written into the sliced directory itself references the shared file directly
    inside = write_stage_model(out, 1, n, out / "tail.onnx")
    assert {e["location"] for e in _external_entries(inside).values()} == {"source_000.data"}
    assert sorted(f.name for f in out.glob("*.data")) == ["source_000.data"]
    # in memory: onnx's loader refuses hard-linked data, layerline's reader does not
    merged = build_stage_model(out, 0, n)
    assert not any(uses_external_data(t) for t in merged.graph.initializer)
    session = open_session(merged.SerializeToString(), 1, True)
    assert np.array_equal(session.run(["pooled"], inputs)[0], want)


def test_moved_or_copied_sliced_dir_still_works(model, sliced, tmp_path):
    src, _, out, manifest = sliced
    moved = tmp_path / "elsewhere" / "sliced"
    moved.parent.mkdir()
    out.rename(moved)
    shutil.rmtree(src.parent)  # the hard link keeps the data: the sliced directory is self-contained
    assert Manifest.load(moved) == manifest
    _assert_runs_like(model, moved, manifest, tmp_path / "w1")
    # a copy with new modification times (cp without -p): accepted, the fingerprint still matches
    copied = tmp_path / "copied"
    shutil.copytree(moved, copied, copy_function=shutil.copyfile)
    assert (copied / "source_000.data").stat().st_mtime_ns != manifest.data_files[0].mtime_ns
    assert not (copied / "source_000.data").samefile(moved / "source_000.data")
    assert Manifest.load(copied) == manifest
    _assert_runs_like(model, copied, manifest, tmp_path / "w2")


def _append(path: Path) -> None:
    with path.open("ab") as f:  # what onnx.save does when it saves again onto an existing data file
        f.write(b"\0" * 16)


def _scribble(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.write(bytes(size))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_append, r"changed since slicing \(\d+ bytes when sliced, \d+ now\)"),
        (_scribble, r"changed since slicing \(same size, different content\)"),
        (lambda data: (data.parent.parent / "sliced" / "source_000.data").unlink(), r"is missing"),
    ],
    ids=["appended", "rewritten", "link-removed"],
)
def test_changed_or_removed_data_is_refused(sliced, tmp_path, change, match):
    _, data, out, manifest = sliced
    change(data)
    for call in (
        lambda: Manifest.load(out),
        lambda: write_stage_model(out, 0, manifest.num_blocks, tmp_path / "st" / "s.onnx"),
        lambda: build_stage_model(out, 0, 2),
    ):
        with pytest.raises(FormatError, match=match) as info:
            call()
        message = str(info.value)
        assert str(out / "source_000.data") in message and "re-run `layerline slice`" in message
    assert not (tmp_path / "st").exists()


def test_replaced_source_leaves_the_slice_consistent(model, sliced, tmp_path):
    """A new file under the source's name (a new inode) does not touch the hard link's data."""
    _, data, out, manifest = sliced
    original = (out / "source_000.data").read_bytes()
    tmp = data.with_suffix(".new")
    tmp.write_bytes(bytes(len(original) + 64))
    tmp.replace(data)
    assert Manifest.load(out) == manifest
    assert (out / "source_000.data").read_bytes() == original
    _assert_runs_like(model, out, manifest, tmp_path / "w")


def test_appended_then_truncated_back_is_accepted(sliced):
    _, data, out, manifest = sliced
    size = data.stat().st_size
    _append(data)
    with data.open("r+b") as f:
        f.truncate(size)
    later = manifest.data_files[0].mtime_ns + 5_000_000_000
    os.utime(data, ns=(later, later))  # the mtime differs for sure: the fingerprint decides
    assert Manifest.load(out) == manifest
    _scribble(data)
    os.utime(data, ns=(later, later))
    with pytest.raises(FormatError, match="same size, different content"):
        Manifest.load(out)


def test_copy_when_no_hard_link_can_be_made(model, tmp_path, other_fs, caplog):
    src = other_fs / "model" / "m.onnx"
    data = _save_external(model, src)
    out = tmp_path / "sliced"
    with caplog.at_level(logging.WARNING, logger="layerline.graph.extdata"):
        manifest = slice_model(src, out)
    assert "copying it instead" in caplog.text
    (record,) = manifest.data_files
    assert record.link == "copy" and record.size_bytes == data.stat().st_size
    assert not (out / record.file).samefile(data)
    _assert_runs_like(model, out, manifest, tmp_path / "w")
    # a stage on another filesystem than the sliced directory gets a copy of just its own weights
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="layerline.graph.stage"):
        stage = write_stage_model(out, 1, manifest.num_blocks, other_fs / "stages" / "s.onnx")
    assert "copying the stage's weights" in caplog.text
    assert sorted(f.name for f in stage.parent.iterdir()) == ["s.data", "s.onnx"]
    assert (stage.parent / "s.data").stat().st_size < record.size_bytes
    one = gm.run_partition(out, manifest, [(0, 1)], gm.feeds(model, 2), True, tmp_path)
    session = open_session(stage, 1, True)
    got = session.run(["pooled"], {i.name: one[i.name] for i in session.get_inputs()})[0]
    assert np.array_equal(got, gm.run_monolithic(model, gm.feeds(model, 2), exact=True)["pooled"])


def test_copy_external_data_option(model, tmp_path):
    src = tmp_path / "model" / "m.onnx"
    data = _save_external(model, src)
    manifest = slice_model(src, tmp_path / "s", copy_external_data=True)
    assert manifest.data_files[0].link == "copy"
    assert not (tmp_path / "s" / "source_000.data").samefile(data)
    assert data.stat().st_nlink == 1
    _assert_runs_like(model, tmp_path / "s", manifest, tmp_path / "w")


def test_reslicing_a_sliced_source_and_protecting_its_files(sliced, tmp_path):
    src, data, out, manifest = sliced
    again = slice_model(src, tmp_path / "again")  # the data file now has two links: still readable
    assert again.blocks == manifest.blocks and data.stat().st_nlink == 3
    biggest = max(manifest.blocks, key=lambda b: b.num_nodes)
    with pytest.raises(SliceError, match="belongs to the model being sliced"):
        slice_model(out / biggest.file, out, overwrite=True, max_live_tensors=8, granularity="op")
    assert Manifest.load(out) == manifest


@pytest.mark.parametrize(
    "options",
    [{"all_tensors_to_one_file": False}, {"location": "sub/dir/w.bin"}],
    ids=["file-per-tensor", "subdirectory"],
)
def test_other_source_layouts(model, tmp_path, options):
    src = tmp_path / "model" / "m.onnx"
    (src.parent / "sub" / "dir").mkdir(parents=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(src), save_as_external_data=True, size_threshold=1024, **options)
    manifest = slice_model(src, tmp_path / "s")
    sources = [d.source for d in manifest.data_files]
    if "location" in options:
        assert sources == ["sub/dir/w.bin"]
    else:  # one file per weight of 1 KiB or more, each linked once
        assert len(set(sources)) == len(sources) == 12
    for d in manifest.data_files:
        assert (tmp_path / "s" / d.file).samefile(src.parent / d.source)
    _assert_runs_like(model, tmp_path / "s", manifest, tmp_path / "w")


def test_missing_source_data_is_refused_before_writing(model, tmp_path):
    src = tmp_path / "model" / "m.onnx"
    _save_external(model, src).unlink()
    with pytest.raises(SliceError, match=r"model/w\.data.*keep the model's data files next to it"):
        slice_model(src, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_data_files_in_the_manifest_json(sliced, tmp_path):
    _, _, out, manifest = sliced
    data = json.loads((out / MANIFEST_FILE).read_text())
    (entry,) = data["data_files"]
    assert set(entry) == {"file", "source", "size_bytes", "mtime_ns", "fingerprint", "link"}
    assert Manifest.from_json(data) == manifest
    for bad in ({"link": "symlink"}, {"file": "../w.data"}, {"size_bytes": "many"}):
        broken = {**data, "data_files": [{**entry, **bad}]}
        with pytest.raises(FormatError, match="malformed manifest"):
            Manifest.from_json(broken)


def _tiny(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", gm.OPSET)])
    model.ir_version = gm.IR_VERSION
    src = tmp_path / "src" / "m.onnx"
    return src, _save_external(model, src), w


def test_the_runtime_path_rules_that_make_us_hard_link(tmp_path):
    """What onnxruntime 1.32 / onnx 1.23 accept as an external data location (docs/manifest.md)."""
    src, data, w = _tiny(tmp_path)
    proto = onnx.load(str(src), load_external_data=False)
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    (blocks / "hard.data").hardlink_to(data)
    (blocks / "soft.data").symlink_to(data)

    def save(location: str) -> str:
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        path = blocks / "m.onnx"
        path.write_bytes(proto.SerializeToString())
        return str(path)

    x = np.ones((1, 8), np.float32)
    for location in (os.path.relpath(data, blocks), str(data), "soft.data"):
        with pytest.raises(Exception, match=r"escapes model directory|Absolute path"):
            ort.InferenceSession(save(location), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(save("hard.data"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": x})[0], x @ w)
    with pytest.raises(Exception, match="hard link"):  # onnx's loader refuses it: we read data ourselves
        onnx.load(save("hard.data"))
