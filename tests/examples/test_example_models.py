"""The built-in example models: valid ONNX, runnable in onnxruntime, numerically sane."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

from layerline.examples import EXAMPLES, param_count, resnet18, transformer, vgg16
from layerline.runtime.session import open_session

TINY = ["vgg16-tiny", "resnet18-tiny", "transformer-tiny"]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module", params=TINY)
def tiny(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto, object]:
    name = request.param
    model = EXAMPLES[name].build()
    return name, model, open_session(model.SerializeToString())


def test_tiny_models_pass_the_full_onnx_check(tiny) -> None:
    name, model, _ = tiny
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    for value in model.graph.input:
        assert _dims(value)[0] == "batch", (name, value.name)
    for value in model.graph.output:
        assert _dims(value)[0] == "batch", (name, value.name)


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_models_run_with_finite_input_dependent_outputs(tiny, batch: int) -> None:
    name, _, session = tiny
    info = EXAMPLES[name]
    feeds = info.sample_inputs(batch, np.random.default_rng(7))
    outputs = session.run(None, feeds)
    for out, spec in zip(outputs, session.get_outputs(), strict=True):
        assert out.shape[0] == batch
        assert np.isfinite(out).all(), (name, spec.name)
        assert 0.1 < float(out.std()) < 100.0, (name, spec.name, float(out.std()))
    # A different input gives clearly different outputs (the network is not degenerate).
    other = session.run(None, info.sample_inputs(batch, np.random.default_rng(8)))
    for a, b in zip(outputs, other, strict=True):
        assert float(np.abs(a - b).mean()) > 0.05 * float(a.std()), name


def test_batch_rows_are_independent(tiny) -> None:
    """Row i of a batch-2 run equals the batch-1 run of that row alone (the batch dim is really dynamic)."""
    name, _, session = tiny
    feeds = EXAMPLES[name].sample_inputs(2, np.random.default_rng(3))
    together = session.run(None, feeds)
    for row in range(2):
        alone = session.run(None, {k: v[row : row + 1] for k, v in feeds.items()})
        for a, t in zip(alone, together, strict=True):
            np.testing.assert_allclose(a[0], t[row], rtol=1e-5, atol=1e-5)


def test_classifier_predictions_vary_with_the_input() -> None:
    """Random-weight classifiers often predict one class for everything; these must not."""
    for name in ("vgg16-tiny", "resnet18-tiny"):
        session = open_session(EXAMPLES[name].build().SerializeToString())
        logits = session.run(None, EXAMPLES[name].sample_inputs(16, np.random.default_rng(0)))[0]
        assert len(set(logits.argmax(axis=1).tolist())) >= 4, name


def test_builders_are_deterministic_and_seeded() -> None:
    a = resnet18(width=0.125, image_size=32, seed=1)
    b = resnet18(width=0.125, image_size=32, seed=1)
    c = resnet18(width=0.125, image_size=32, seed=2)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.graph.initializer[0].raw_data != c.graph.initializer[0].raw_data


def test_vgg16_structure_and_size_parameters() -> None:
    model = vgg16(width=0.125, image_size=64, num_classes=10)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 13 and ops.count("Relu") == 15 and ops.count("MaxPool") == 5
    assert ops.count("Gemm") == 3
    assert _dims(model.graph.input[0]) == ["batch", 3, 64, 64]
    assert _dims(model.graph.output[0]) == ["batch", 10]
    out = open_session(model.SerializeToString()).run(
        None, {"input": np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)}
    )[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()


def test_resnet18_full_size_runs() -> None:
    model = resnet18()
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == 8 and ops.count("Conv") == 20 and ops.count("BatchNormalization") == 20
    assert 11_000_000 < param_count(model) < 12_500_000
    feeds = EXAMPLES["resnet18"].sample_inputs(2, np.random.default_rng(0))
    logits = open_session(model.SerializeToString(), threads=2).run(None, feeds)[0]
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert 0.5 < float(logits.std()) < 20.0
    assert float(np.abs(logits[0] - logits[1]).mean()) > 0.1


def test_transformer_mask_feeds_every_layer() -> None:
    model = transformer(layers=3, d_model=32, heads=4, vocab=50, max_seq=16)
    bias = next(n.output[0] for n in model.graph.node if n.name == "mask/bias")
    consumers = [n for n in model.graph.node if bias in n.input]
    assert len(consumers) == 3
    assert {n.op_type for n in consumers} == {"Add"}
    assert [_dims(v) for v in model.graph.input] == [["batch", "seq"], ["batch", "seq"]]
    assert [v.name for v in model.graph.output] == ["hidden", "pooled"]
    assert [_dims(v) for v in model.graph.output] == [["batch", "seq", 32], ["batch", 32]]


def test_transformer_attention_mask_is_used() -> None:
    info = EXAMPLES["transformer-tiny"]
    session = open_session(info.build().SerializeToString())
    feeds = info.sample_inputs(2, np.random.default_rng(0), seq=12)
    mask = feeds["attention_mask"]
    assert mask[-1, -1] == 0 and mask[:, 0].all()
    real = int(mask[1].sum())
    hidden, pooled = session.run(None, feeds)

    # Changing the ids at padded positions does not change any real token's output...
    ids = feeds["input_ids"].copy()
    ids[1, real:] = 7
    hidden2, pooled2 = session.run(None, {**feeds, "input_ids": ids})
    np.testing.assert_allclose(hidden2[1, :real], hidden[1, :real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled2, pooled, rtol=1e-5, atol=1e-5)

    # ...while masking one more real token changes the others (in row 1 only).
    masked = mask.copy()
    masked[1, real - 1] = 0
    hidden3, pooled3 = session.run(None, {**feeds, "attention_mask": masked})
    assert float(np.abs(hidden3[1, : real - 1] - hidden[1, : real - 1]).max()) > 1e-2
    assert float(np.abs(pooled3[1] - pooled[1]).max()) > 1e-3
    np.testing.assert_allclose(hidden3[0], hidden[0], rtol=1e-5, atol=1e-5)


def test_transformer_accepts_any_sequence_length_up_to_max_seq() -> None:
    info = EXAMPLES["transformer-tiny"]
    session = open_session(info.build().SerializeToString())
    for seq in (1, 5, 64):
        hidden, pooled = session.run(None, info.sample_inputs(2, np.random.default_rng(seq), seq=seq))
        assert hidden.shape == (2, seq, 64) and pooled.shape == (2, 64)
        assert np.isfinite(hidden).all()


@pytest.mark.slow
def test_full_vgg16_builds_quickly_with_138m_parameters() -> None:
    start = time.perf_counter()
    model = vgg16()
    seconds = time.perf_counter() - start
    assert param_count(model) == 138_357_544
    assert seconds < 20.0, f"building VGG16 took {seconds:.1f} s"
    session = open_session(model.SerializeToString(), threads=2)
    del model
    logits = session.run(None, EXAMPLES["vgg16"].sample_inputs(2, np.random.default_rng(0)))[0]
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert 0.5 < float(logits.std()) < 20.0
    assert float(np.abs(logits[0] - logits[1]).mean()) > 0.3 * float(logits.std())


@pytest.mark.slow
def test_full_transformer_runs() -> None:
    info = EXAMPLES["transformer"]
    model = info.build()
    assert 105_000_000 < param_count(model) < 115_000_000
    session = open_session(model.SerializeToString(), threads=2)
    hidden, pooled = session.run(None, info.sample_inputs(2, np.random.default_rng(0), seq=16))
    assert hidden.shape == (2, 16, 768) and pooled.shape == (2, 768)
    assert np.isfinite(hidden).all() and 0.5 < float(hidden.std()) < 2.0
