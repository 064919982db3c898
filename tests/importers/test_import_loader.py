"""load_model: dispatch by suffix and clear errors (needs neither torch nor keras)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from layerline.errors import ModelImportError
from layerline.examples import EXAMPLES
from layerline.importers import SUPPORTED_SUFFIXES, load_model
from layerline.runtime.session import open_session


def test_onnx_file_loads(tmp_path: Path) -> None:
    model = EXAMPLES["resnet18-tiny"].build()
    onnx.save_model(model, str(tmp_path / "r.onnx"))
    assert load_model(tmp_path / "r.onnx").SerializeToString() == model.SerializeToString()
    assert load_model(str(tmp_path / "r.onnx")).graph.name == "resnet18"


def test_onnx_external_data_is_loaded_inline(tmp_path: Path) -> None:
    model = EXAMPLES["vgg16-tiny"].build()
    onnx.save_model(model, str(tmp_path / "v.onnx"), save_as_external_data=True, location="weights.bin")
    assert (tmp_path / "weights.bin").is_file()
    loaded = load_model(tmp_path / "v.onnx")
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    feeds = EXAMPLES["vgg16-tiny"].sample_inputs(1)
    np.testing.assert_array_equal(
        open_session(loaded.SerializeToString()).run(None, feeds)[0],
        open_session(EXAMPLES["vgg16-tiny"].build().SerializeToString()).run(None, feeds)[0],
    )
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelImportError, match="external data file"):
        load_model(tmp_path / "v.onnx")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match=r"absent\.onnx: no such file"):
        load_model(tmp_path / "absent.onnx")


def test_unknown_suffix_lists_formats_and_points_to_from_torch(tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelImportError) as info:
        load_model(path)
    message = str(info.value)
    assert "'.tflite'" in message and "from_torch" in message
    assert all(suffix in message for suffix in SUPPORTED_SUFFIXES)


def test_pytorch_checkpoint_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelImportError, match=r"from_torch\(module, example_inputs"):
        load_model(path)


def test_directory_and_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "saved_model.onnx").mkdir()
    with pytest.raises(ModelImportError, match="is a directory"):
        load_model(tmp_path / "saved_model.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"this is not protobuf \xff\xfe")
    with pytest.raises(ModelImportError, match="not a readable ONNX model"):
        load_model(tmp_path / "bad.onnx")


def test_missing_extras_say_what_to_install() -> None:
    """Without torch (or keras) the converters name the extra to install."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['keras'] = None\n"
        "from layerline.errors import ModelImportError\n"
        "from layerline.importers import from_keras, from_torch\n"
        "for call in (lambda: from_torch(object(), ()), lambda: from_keras('m.keras')):\n"
        "    try:\n"
        "        call()\n"
        "    except ModelImportError as exc:\n"
        "        print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "pip install 'layerline[torch]'" in lines[0]
    assert "pip install 'layerline[keras]'" in lines[1]
