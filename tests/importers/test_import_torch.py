"""from_torch: real PyTorch modules exported, run in onnxruntime and compared with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from layerline.errors import ModelImportError
from layerline.importers import from_torch, load_model
from layerline.runtime.session import open_session

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.torch


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(image))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MaskedEncoder(nn.Module):
    """A TransformerEncoder taking a key padding mask (True = padding) as a second input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(features), src_key_padding_mask=padding_mask)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Distinct random weights everywhere (TransformerEncoder clones one layer) and non-trivial BN stats."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5 + 0.05))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module.eval()


def _mask(batch: int, seq: int) -> torch.Tensor:
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[-1, seq - 2 :] = True
    return mask


def _check_against_torch(model: onnx.ModelProto, module: nn.Module, make_inputs) -> None:
    session = open_session(model.SerializeToString())
    names = [i.name for i in session.get_inputs()]
    for batch in (1, 3):
        inputs = make_inputs(batch)
        with torch.no_grad():
            expected = module(*inputs).numpy()
        (actual,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_residual_cnn_with_default_exporter() -> None:
    module = _randomize(ResidualCNN(), 0)
    model = from_torch(module, torch.randn(1, 3, 16, 16), output_names=["logits"])
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["layerline.exporter"] == "torch.onnx.export(dynamo=True)"
    assert meta["layerline.verified"] == "true"
    assert [i.name for i in model.graph.input] == ["image"]  # forward()'s argument name
    assert _dims(model.graph.input[0]) == ["batch", 3, 16, 16]
    assert _dims(model.graph.output[0]) == ["batch", 10]
    assert model.graph.initializer, "weights are inline"
    onnx.checker.check_model(model)
    _check_against_torch(model, module, lambda b: (torch.randn(b, 3, 16, 16),))


def test_residual_cnn_with_torchscript_exporter(tmp_path: Path) -> None:
    module = _randomize(ResidualCNN(), 1)
    model = from_torch(
        module,
        (torch.randn(2, 3, 16, 16),),
        exporter="torchscript",
        input_names=["x"],
        path=tmp_path / "m.onnx",
    )
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["layerline.exporter"] == "torch.onnx.export(dynamo=False)"
    assert model.opset_import[0].version == 17
    assert _dims(model.graph.input[0])[0] == "batch" and _dims(model.graph.output[0])[0] == "batch"
    _check_against_torch(model, module, lambda b: (torch.randn(b, 3, 16, 16),))
    assert load_model(tmp_path / "m.onnx").SerializeToString() == model.SerializeToString()


def test_transformer_encoder_with_padding_mask() -> None:
    module = _randomize(MaskedEncoder(), 2)
    model = from_torch(module, (torch.randn(2, 7, 16), _mask(2, 7)), output_names=["hidden"])
    assert [i.name for i in model.graph.input] == ["features", "padding_mask"]
    assert [_dims(i)[0] for i in (*model.graph.input, *model.graph.output)] == ["batch"] * 3
    _check_against_torch(model, module, lambda b: (torch.randn(b, 7, 16), _mask(b, 7)))
    # the mask is really an input of the exported graph: padding one more position changes the output
    session = open_session(model.SerializeToString())
    x = torch.randn(1, 7, 16).numpy()
    free = session.run(None, {"features": x, "padding_mask": _mask(1, 7).numpy()})[0]
    more = _mask(1, 7)
    more[0, 3] = True
    assert np.abs(session.run(None, {"features": x, "padding_mask": more.numpy()})[0] - free).max() > 1e-3


def test_transformer_encoder_with_torchscript_exporter() -> None:
    module = _randomize(MaskedEncoder(), 3)
    model = from_torch(module, (torch.randn(2, 7, 16), _mask(2, 7)), exporter="torchscript")
    _check_against_torch(model, module, lambda b: (torch.randn(b, 7, 16), _mask(b, 7)))


def test_training_mode_is_restored_and_fixed_batch_is_possible() -> None:
    module = _randomize(ResidualCNN(), 4).train()
    model = from_torch(module, torch.randn(2, 3, 16, 16), dynamic_batch=False, exporter="torchscript")
    assert module.training
    assert _dims(model.graph.input[0]) == [2, 3, 16, 16]


class BatchSpecific(nn.Module):
    """Python control flow on the batch size: no exporter can keep the batch dimension dynamic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 2 else x * 3


def test_export_that_does_not_generalise_is_refused() -> None:
    with pytest.raises(ModelImportError) as info:
        from_torch(BatchSpecific(), torch.randn(2, 4))
    message = str(info.value)
    assert "dynamo exporter" in message and "torchscript exporter" in message
    # the TorchScript trace ran, but verification at batch 3 caught the specialised graph
    assert "differs from the original" in message


class ReturnsDict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x + 1}


def test_bad_arguments_are_explained() -> None:
    with pytest.raises(ModelImportError, match=r"takes a torch\.nn\.Module"):
        from_torch(lambda x: x, torch.randn(1, 2))
    with pytest.raises(ModelImportError, match="same batch size"):
        from_torch(MaskedEncoder(), (torch.randn(2, 7, 16), _mask(3, 7)))
    with pytest.raises(ModelImportError, match="tuple of tensors"):
        from_torch(ReturnsDict(), torch.randn(2, 3))
    with pytest.raises(ModelImportError, match="example input 0 is a list"):
        from_torch(ReturnsDict(), ([1.0, 2.0],))
    with pytest.raises(ModelImportError, match="input_names must be 1 distinct"):
        from_torch(ResidualCNN(), torch.randn(2, 3, 8, 8), input_names=["a", "b"])
    with pytest.raises(ModelImportError, match="exporter must be"):
        from_torch(ResidualCNN(), torch.randn(2, 3, 8, 8), exporter="fx")


def test_models_over_the_protobuf_limit_take_the_external_data_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking, verifying and saving switch to external data above 2 GB; a lowered limit exercises them."""
    from layerline.importers import _onnxio

    monkeypatch.setattr(_onnxio, "EXTERNAL_DATA_THRESHOLD", 1_000)
    module = _randomize(ResidualCNN(), 5)
    model = from_torch(module, torch.randn(2, 3, 16, 16), exporter="torchscript", path=tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").is_file()
    assert {p.key: p.value for p in model.metadata_props}["layerline.verified"] == "true"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    _check_against_torch(load_model(tmp_path / "m.onnx"), module, lambda b: (torch.randn(b, 3, 16, 16),))
