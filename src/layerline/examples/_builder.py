"""A small helper that accumulates ONNX nodes and seeded random weights into a model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from layerline.examples._moments import Moments

__all__ = ["IR_VERSION", "OPSET", "GraphBuilder", "float_input", "int64_input", "param_count"]

#: Every example model targets this opset (and the matching IR version), so any onnxruntime >= 1.14 runs it.
OPSET = 17
IR_VERSION = 8


class GraphBuilder:
    """Collects nodes and initializers; names are unique and readable (``"stage2/block1/conv1"``)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[tuple[str, np.ndarray]] = []
        self._names: set[str] = set()

    # -- names and weights ------------------------------------------------------------------------------
    def unique(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``... if it is taken."""
        candidate, i = name, 1
        while candidate in self._names:
            i += 1
            candidate = f"{name}_{i}"
        self._names.add(candidate)
        return candidate

    def const(self, name: str, value: np.ndarray) -> str:
        """Add ``value`` as an initializer; returns its (unique) name."""
        name = self.unique(name)
        self.initializers.append((name, np.asarray(value, order="C")))  # (ascontiguousarray makes 0-d 1-d)
        return name

    def normal(self, name: str, shape: Sequence[int], std: float) -> str:
        """A float32 initializer drawn from N(0, std^2)."""
        w = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        w *= np.float32(std)
        return self.const(name, w)

    def uniform(self, name: str, shape: Sequence[int], low: float, high: float) -> str:
        return self.const(name, self.rng.uniform(low, high, tuple(shape)).astype(np.float32))

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, np.asarray(value, dtype=np.float32))

    # -- nodes -----------------------------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], name: str, outputs: int = 1, **attrs: Any) -> Any:
        """Append one node named ``name``; returns its output name (or a list of them if ``outputs > 1``)."""
        node_name = self.unique(name)
        outs = [node_name] if outputs == 1 else [self.unique(f"{node_name}:{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=node_name, **attrs))
        return outs[0] if outputs == 1 else outs

    def rename_output(self, tensor: str, new_name: str) -> str:
        """Make the node producing ``tensor`` write ``new_name`` instead (for graph outputs)."""
        for node in reversed(self.nodes):
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = new_name
                    self._names.add(new_name)
                    return new_name
        raise AssertionError(f"no node produces {tensor!r}")

    # -- layers (see _moments for why every layer knows the statistics of its input) ---------------------
    def _centred(self, shape: tuple[int, ...], m_in: Moments, gain: float) -> tuple[np.ndarray, np.ndarray]:
        """Weights ``[out, ...]`` whose outputs have std ``gain``, and the bias cancelling the input mean."""
        fan_in = int(np.prod(shape[1:]))
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(gain / math.sqrt(fan_in * m_in.var))
        bias = -m_in.mean * w.reshape(shape[0], -1).sum(axis=1, dtype=np.float64)
        return w, bias.astype(np.float32)

    def conv(self, x: str, c_in: int, c_out: int, k: int, name: str, m_in: Moments, stride: int = 1) -> str:
        """A ``k x k`` convolution (padding ``k // 2``) whose output has mean 0 and variance 1."""
        w, bias = self._centred((c_out, c_in, k, k), m_in, 1.0)
        pad = k // 2
        return self.node(
            "Conv",
            [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", bias)],
            name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
        )

    def conv_bn(
        self,
        x: str,
        c_in: int,
        c_out: int,
        k: int,
        name: str,
        m_in: Moments,
        stride: int = 1,
        gamma: tuple[float, float] = (0.9, 1.1),
    ) -> str:
        """Bias-free He-initialised convolution + BatchNormalization whose running statistics are the
        convolution's output statistics over random inputs (as training would have measured them)."""
        fan_in = c_in * k * k
        w = self.rng.standard_normal((c_out, c_in, k, k), dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / fan_in))
        flat = w.reshape(c_out, -1).astype(np.float64)
        mean = m_in.mean * flat.sum(axis=1)
        var = m_in.var * (flat * flat).sum(axis=1) * self.rng.uniform(0.95, 1.05, c_out)
        pad = k // 2
        y = self.node(
            "Conv",
            [x, self.const(f"{name}/conv.weight", w)],
            f"{name}/conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
        )
        inputs = [
            y,
            self.uniform(f"{name}/bn.weight", (c_out,), *gamma),
            self.uniform(f"{name}/bn.bias", (c_out,), -0.02, 0.02),
            self.const(f"{name}/bn.running_mean", mean.astype(np.float32)),
            self.const(f"{name}/bn.running_var", var.astype(np.float32)),
        ]
        return self.node("BatchNormalization", inputs, f"{name}/bn", epsilon=1e-5)

    def gemm(self, x: str, d_in: int, d_out: int, name: str, m_in: Moments, gain: float = 1.0) -> str:
        """A fully connected layer on ``[batch, d_in]`` as one Gemm (weights stored ``[out, in]``) whose
        output has mean 0 and standard deviation ``gain``."""
        w, bias = self._centred((d_out, d_in), m_in, gain)
        inputs = [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", bias)]
        return self.node("Gemm", inputs, name, transB=1)

    def linear(self, x: str, d_in: int, d_out: int, name: str, m_in: Moments, gain: float = 1.0) -> str:
        """``x @ W + b`` on inputs of any rank (MatMul + Add), output mean 0 and std ``gain``."""
        w, bias = self._centred((d_out, d_in), m_in, gain)
        y = self.node("MatMul", [x, self.const(f"{name}.weight", w.T)], f"{name}/matmul")
        return self.node("Add", [y, self.const(f"{name}.bias", bias)], f"{name}/bias")

    # -- model -----------------------------------------------------------------------------------------
    def model(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        doc: str,
        metadata: dict[str, str] | None = None,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, list(inputs), list(outputs), doc_string=doc)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="layerline.examples",
            doc_string=doc,
        )
        # Weights go straight into the model's graph: make_graph/make_model copy whatever they are given, and
        # three copies of VGG16's 553 MB took longer than drawing the random numbers.
        for name, array in self.initializers:
            tensor = model.graph.initializer.add()
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.raw_data = array.tobytes()
        self.initializers.clear()
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model


def float_input(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def int64_input(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, list(shape))


def param_count(model: onnx.ModelProto) -> int:
    """Number of scalars held by the model's initializers."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
