"""from_keras: a Keras 3 CNN saved as .keras/.h5, converted, run in onnxruntime, compared with predict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from layerline.errors import ModelImportError
from layerline.importers import from_keras, import_keras, load_model
from layerline.runtime.session import open_session

pytest.importorskip("torch")
pytestmark = pytest.mark.keras

try:
    keras = import_keras()
except ModelImportError as exc:  # keras missing, or imported with another backend by someone else
    pytest.skip(str(exc), allow_module_level=True)

from layerline.examples import keras_cnn  # noqa: E402


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keras_cnn(tmp_path_factory.mktemp("keras") / "cnn.keras")


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _assert_matches_predict(model: onnx.ModelProto, keras_model: object) -> None:
    session = open_session(model.SerializeToString())
    rng = np.random.default_rng(5)
    for batch in (1, 4):
        x = rng.standard_normal((batch, 32, 32, 3), dtype=np.float32)
        (actual,) = session.run(None, {"image": x})
        expected = keras_model.predict(x, verbose=0)
        assert actual.shape == (batch, 10)
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_keras_file_converts_and_matches_predict(cnn_file: Path, tmp_path: Path) -> None:
    model = from_keras(cnn_file, path=tmp_path / "cnn.onnx")
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _dims(model.graph.input[0]) == ["batch", 32, 32, 3]
    assert _dims(model.graph.output[0]) == ["batch", 10]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["layerline.source"] == "keras" and meta["layerline.verified"] == "true"
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "MaxPool"} <= ops
    reference = keras.saving.load_model(cnn_file, compile=False)
    _assert_matches_predict(model, reference)
    assert onnx.load(str(tmp_path / "cnn.onnx")).SerializeToString() == model.SerializeToString()


def test_batchnorm_statistics_survive(cnn_file: Path) -> None:
    """keras_cnn sets non-trivial BN statistics; a conversion that dropped them would not match predict."""
    reference = keras.saving.load_model(cnn_file, compile=False)
    assert float(np.abs(np.asarray(reference.get_layer("bn1").moving_mean)).max()) > 0.05
    _assert_matches_predict(from_keras(reference), reference)


def test_h5_files_load_through_load_model(cnn_file: Path, tmp_path: Path) -> None:
    reference = keras.saving.load_model(cnn_file, compile=False)
    h5 = tmp_path / "cnn.h5"
    reference.save(h5)
    _assert_matches_predict(load_model(h5), reference)
    _assert_matches_predict(load_model(cnn_file), reference)


def test_keras_errors_name_the_cause(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="no such file"):
        from_keras(tmp_path / "absent.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(ModelImportError, match="Keras could not load it"):
        from_keras(broken)
    with pytest.raises(ModelImportError, match=r"takes a keras\.Model"):
        from_keras(42)
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ModelImportError, match="no defined inputs"):
        from_keras(unbuilt)


def test_other_keras_backend_is_refused(tmp_path: Path) -> None:
    """In a fresh process asking for another backend, from_keras says to use KERAS_BACKEND=torch."""
    code = (
        "from layerline.importers import from_keras\n"
        "from layerline.errors import ModelImportError\n"
        "try:\n"
        "    from_keras('model.keras')\n"
        "except ModelImportError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "KERAS_BACKEND=jax" in result.stdout and "KERAS_BACKEND=torch" in result.stdout
    assert "keras" not in result.stderr.lower()
