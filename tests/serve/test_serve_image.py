"""Image input helpers: layout detection, scaling, Pillow-less behaviour, top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerline.errors import BadRequest, LayerlineError
from layerline.serve.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_layout,
    image_to_tensor,
    load_image,
    pillow_available,
    softmax,
    top_k,
)
from layerline.tensors import TensorSpec

NCHW = TensorSpec("input", "float32", ("batch", 3, 4, 5))
NHWC = TensorSpec("input", "float32", ("N", 4, 5, 3))
GRAY = TensorSpec("input", "float32", ("batch", 1, 4, 5))


def _pixels(h: int = 4, w: int = 5, c: int = 3) -> np.ndarray:
    return (np.arange(h * w * c) * 7 % 256).astype(np.uint8).reshape(h, w, c)


@pytest.mark.parametrize(
    ("spec", "layout"),
    [
        (NCHW, ("NCHW", 3, 4, 5)),
        (NHWC, ("NHWC", 3, 4, 5)),
        (GRAY, ("NCHW", 1, 4, 5)),
        (TensorSpec("i", "float32", ("b", 3, "h", "w")), ("NCHW", 3, "h", "w")),
    ],
)
def test_image_layout(spec: TensorSpec, layout: tuple) -> None:
    assert image_layout(spec) == layout


@pytest.mark.parametrize("shape", [("batch", 8), ("batch", 4, 4, 4), (1, 2, 3)])
def test_non_image_inputs_are_refused(shape: tuple) -> None:
    with pytest.raises(BadRequest, match="is not an image input"):
        image_layout(TensorSpec("x", "float32", shape))


def test_image_to_tensor_nchw_imagenet() -> None:
    px = _pixels()
    out = image_to_tensor(px, NCHW)
    assert out.shape == (1, 3, 4, 5) and out.dtype == np.float32 and out.flags.c_contiguous
    for c in range(3):
        want = (px[:, :, c].astype(np.float32) / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(out[0, c], want, rtol=1e-6, atol=1e-6)


def test_image_to_tensor_nhwc_unit_raw_and_gray() -> None:
    px = _pixels()
    np.testing.assert_allclose(image_to_tensor(px, NHWC, "unit")[0], px / 255, rtol=1e-6)
    np.testing.assert_array_equal(image_to_tensor(px, NHWC, "raw")[0], px.astype(np.float32))
    gray = image_to_tensor(_pixels(c=1), GRAY, "raw")
    assert gray.shape == (1, 1, 4, 5)
    half = TensorSpec("input", "float16", ("batch", 3, 4, 5))
    assert image_to_tensor(px, half).dtype == np.float16
    with pytest.raises(BadRequest, match="expected H x W x 3 pixels"):
        image_to_tensor(_pixels(c=1), NCHW)
    with pytest.raises(ValueError, match="scaling must be"):
        image_to_tensor(px, NCHW, "caffe")  # type: ignore[arg-type]


@pytest.mark.skipif(pillow_available(), reason="Pillow is installed here")
def test_load_image_without_pillow_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(
        LayerlineError, match=r"needs Pillow, which is not installed: `pip install pillow`, or pass"
    ):
        load_image(tmp_path / "cat.jpg", NCHW)


def test_load_image_with_pillow(tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    src = np.zeros((40, 60, 3), np.uint8)
    src[:, :30] = (255, 0, 0)  # left half red, right half blue
    src[:, 30:] = (0, 0, 255)
    path = tmp_path / "img.png"
    image_mod.fromarray(src).save(path)
    spec = TensorSpec("input", "float32", ("batch", 3, 20, 30))
    out = load_image(path, spec, scaling="raw")
    assert out.shape == (1, 3, 20, 30)
    assert out[0, 0, 10, 2] == 255 and out[0, 2, 10, 2] == 0  # red on the left
    assert out[0, 2, 10, 27] == 255 and out[0, 0, 10, 27] == 0  # blue on the right
    nhwc = load_image(path, TensorSpec("input", "float32", ("b", "h", "w", 3)), scaling="unit")
    assert nhwc.shape == (1, 40, 60, 3)  # dynamic H and W keep the image's size
    assert load_image(path, spec, size=(8, 9)).shape == (1, 3, 8, 9)
    gray = load_image(path, TensorSpec("input", "float32", ("b", 1, 10, 10)), scaling="raw")
    assert gray.shape == (1, 1, 10, 10)
    with pytest.raises(BadRequest, match="does not exist"):
        load_image(tmp_path / "missing.png", spec)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(BadRequest, match="cannot read"):
        load_image(tmp_path / "bad.png", spec)


def test_softmax_and_top_k() -> None:
    logits = np.array([1.0, 3.0, 2.0, 0.0], np.float32)
    probs = softmax(logits)
    assert probs.sum() == pytest.approx(1.0)
    row = top_k(logits, 2)  # one row of scores: one list of (class, probability)
    assert [c for c, _ in row] == [1, 2]
    assert row[0][1] == pytest.approx(float(probs[1]))
    batch = np.array([[0.0, 10.0], [10.0, 0.0]])  # a batch: one list per row
    assert [[c for c, _ in r] for r in top_k(batch, 5)] == [[1, 0], [0, 1]]  # k capped at classes
    assert top_k([0.2, 0.7, 0.1], 1, apply_softmax=False) == [(1, 0.7)]
    assert top_k(np.array([[0.0, 0.0, 0.0]]), 2) == [[(0, pytest.approx(1 / 3)), (1, pytest.approx(1 / 3))]]
    assert softmax(np.array([1000.0, 1000.0])).tolist() == [0.5, 0.5]  # no overflow
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k(logits, 0)
    with pytest.raises(ValueError, match="top_k needs"):
        top_k(np.zeros((2, 2, 2)), 1)
