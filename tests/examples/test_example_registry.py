"""The example registry, ``build_example`` and saving (external data included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from layerline.errors import LayerlineError
from layerline.examples import EXAMPLES, build_example, get_example
from layerline.importers import _onnxio, load_model
from layerline.runtime.session import open_session


def test_registry_names() -> None:
    assert set(EXAMPLES) == {
        "vgg16",
        "resnet18",
        "transformer",
        "vgg16-tiny",
        "resnet18-tiny",
        "transformer-tiny",
    }
    for name, info in EXAMPLES.items():
        assert info.name == name and info.description


def test_unknown_example_and_bad_sizes_name_the_fix() -> None:
    with pytest.raises(LayerlineError, match="choose one of vgg16"):
        get_example("alexnet")
    with pytest.raises(LayerlineError, match=r"no size argument depth.*accepts"):
        EXAMPLES["vgg16-tiny"].build(depth=3)
    with pytest.raises(LayerlineError, match="multiple of 32"):
        EXAMPLES["vgg16-tiny"].build(image_size=40)
    with pytest.raises(LayerlineError, match="multiple of heads"):
        EXAMPLES["transformer-tiny"].build(heads=5)
    with pytest.raises(LayerlineError, match="batch must be >= 1"):
        EXAMPLES["vgg16-tiny"].sample_inputs(0)


def test_size_overrides_reach_builder_and_inputs() -> None:
    info = EXAMPLES["vgg16-tiny"]
    model = info.build(image_size=64, num_classes=7)
    feeds = info.sample_inputs(3, image_size=64)
    assert feeds["input"].shape == (3, 3, 64, 64) and feeds["input"].dtype == np.float32
    out = open_session(model.SerializeToString()).run(None, feeds)[0]
    assert out.shape == (3, 7)


def test_token_inputs_are_valid() -> None:
    info = EXAMPLES["transformer-tiny"]
    feeds = info.sample_inputs(5, np.random.default_rng(1), seq=20)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (5, 20)
    assert ids.min() >= 0 and ids.max() < 1000
    assert (mask == 0).any() and mask[:, 0].all()
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] > 0).all()
    # padding only at the end of a row
    assert (np.diff(mask, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="max_seq=64"):
        info.sample_inputs(1, seq=65)


def test_build_example_to_file_and_directory(tmp_path: Path) -> None:
    path = build_example("resnet18-tiny", tmp_path / "models" / "r.onnx")
    assert path == tmp_path / "models" / "r.onnx"
    assert onnx.load(str(path)).SerializeToString() == EXAMPLES["resnet18-tiny"].build().SerializeToString()
    in_dir = build_example("transformer-tiny", tmp_path, layers=1)
    assert in_dir == tmp_path / "transformer-tiny.onnx"
    assert sum(n.op_type == "Softmax" for n in onnx.load(str(in_dir)).graph.node) == 1


def test_big_models_are_saved_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lower the 2 GB threshold instead of building a 2 GB model; the saving code path is the same.
    monkeypatch.setattr(_onnxio, "EXTERNAL_DATA_THRESHOLD", 10_000)
    model = EXAMPLES["vgg16-tiny"].build()
    _onnxio.check_model(model)
    path = build_example("vgg16-tiny", tmp_path / "v.onnx")
    data = tmp_path / "v.onnx.data"
    assert data.is_file() and data.stat().st_size > 4_000_000
    assert path.stat().st_size < 100_000
    loaded = load_model(path)
    feeds = EXAMPLES["vgg16-tiny"].sample_inputs(2)
    expected = open_session(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_array_equal(open_session(path).run(None, feeds)[0], expected)
    np.testing.assert_array_equal(open_session(loaded.SerializeToString()).run(None, feeds)[0], expected)


def test_saving_with_external_data_leaves_the_model_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_onnxio, "EXTERNAL_DATA_THRESHOLD", 10_000)
    model = EXAMPLES["resnet18-tiny"].build()
    before = model.SerializeToString()
    _onnxio.save_model(model, tmp_path / "r.onnx")
    assert (tmp_path / "r.onnx.data").is_file()
    assert model.SerializeToString() == before


def test_examples_need_neither_torch_nor_keras(tmp_path: Path) -> None:
    """In a process where torch and keras cannot be imported, every example still builds and runs."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['keras'] = None\n"
        "import numpy as np\n"
        "from layerline.examples import EXAMPLES, build_example\n"
        "from layerline.runtime.session import open_session\n"
        "for name in ('vgg16-tiny', 'resnet18-tiny', 'transformer-tiny'):\n"
        "    path = build_example(name, sys.argv[1])\n"
        "    out = open_session(path).run(None, EXAMPLES[name].sample_inputs(2))\n"
        "    assert all(np.isfinite(o).all() for o in out)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'keras', 'onnxscript')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['keras', 'torch']"  # only the blocked placeholders
    assert len(list(tmp_path.glob("*.onnx"))) == 3
