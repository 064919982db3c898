"""The package's public surface is what we mean it to be, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import layerline
from layerline import errors


def test_top_level_names():
    assert set(layerline.__all__) == {
        "LayerlineError",
        "__version__",
        "from_keras",
        "from_torch",
        "load_model",
        "slice_model",
    }
    for name in layerline.__all__:
        assert getattr(layerline, name) is not None


def test_every_error_derives_from_the_root():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.LayerlineError)


def test_import_loads_no_framework():
    code = "import sys, layerline; print([m for m in ('torch', 'keras', 'onnxruntime') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
