"""A BERT-style transformer encoder built directly as ONNX with random weights."""

from __future__ import annotations

import math

import numpy as np
import onnx

from layerline.examples._builder import GraphBuilder, float_input, int64_input
from layerline.examples._moments import Moments

__all__ = ["token_inputs", "transformer"]

#: Added to the attention scores of padded positions (BERT's convention): exp(-10000) is exactly 0.
_MASK_VALUE = -10000.0
_LN_EPSILON = 1e-5
#: Standard deviation of what the attention and FFN branches add to the residual stream (which is 1). At 1,
#: every layer's attention averaging pulls the tokens together and 12 layers leave them nearly identical.
_BRANCH_GAIN = 0.5


def _layer_norm(g: GraphBuilder, x: str, d: int, name: str) -> str:
    scale = g.uniform(f"{name}.weight", (d,), 0.9, 1.1)
    bias = g.uniform(f"{name}.bias", (d,), -0.05, 0.05)
    return g.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=_LN_EPSILON)


def _gelu(g: GraphBuilder, x: str, name: str, consts: dict[str, str]) -> str:
    """The exact GELU ``0.5 * x * (1 + erf(x / sqrt(2)))`` (opset 17 has no Gelu operator)."""
    e = g.node("Erf", [g.node("Mul", [x, consts["inv_sqrt2"]], f"{name}/scale")], f"{name}/erf")
    y = g.node("Add", [e, consts["one"]], f"{name}/add")
    y = g.node("Mul", [y, consts["half"]], f"{name}/half")
    return g.node("Mul", [x, y], f"{name}/mul")


def _heads(g: GraphBuilder, x: str, name: str, perm: list[int], consts: dict[str, str]) -> str:
    """``[b, s, d]`` -> ``[b, h, s, dh]`` (or ``[b, h, dh, s]`` with ``perm=[0, 2, 3, 1]``)."""
    y = g.node("Reshape", [x, consts["split_heads"]], f"{name}/split")
    return g.node("Transpose", [y], f"{name}/transpose", perm=perm)


def _attention(g: GraphBuilder, x: str, bias: str, d: int, heads: int, name: str, c: dict[str, str]) -> str:
    unit = Moments(0.0, 1.0)
    q = _heads(g, g.linear(x, d, d, f"{name}/query", unit), f"{name}/query", [0, 2, 1, 3], c)
    k = _heads(g, g.linear(x, d, d, f"{name}/key", unit), f"{name}/key", [0, 2, 3, 1], c)
    v = _heads(g, g.linear(x, d, d, f"{name}/value", unit), f"{name}/value", [0, 2, 1, 3], c)
    scores = g.node("MatMul", [q, k], f"{name}/scores")
    scores = g.node("Mul", [scores, c["score_scale"]], f"{name}/scale")
    scores = g.node("Add", [scores, bias], f"{name}/mask")
    probs = g.node("Softmax", [scores], f"{name}/softmax", axis=-1)
    ctx = g.node("MatMul", [probs, v], f"{name}/context")
    ctx = g.node("Transpose", [ctx], f"{name}/merge/transpose", perm=[0, 2, 1, 3])
    ctx = g.node("Reshape", [ctx, c["merge_heads"]], f"{name}/merge")
    # Averaging over the attended positions shrinks the variance (to about half, measured).
    return g.linear(ctx, d, d, f"{name}/output", Moments(0.0, 0.5), gain=_BRANCH_GAIN)


def transformer(
    layers: int = 12,
    d_model: int = 768,
    heads: int = 12,
    vocab: int = 30522,
    max_seq: int = 512,
    ffn: int | None = None,
    pooled: bool = True,
    seed: int = 0,
) -> onnx.ModelProto:
    """A post-LayerNorm encoder (BERT-base by default, ~110 M parameters).

    Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``, 1 = real token, 0 = padding);
    outputs ``hidden`` (float32 ``[batch, seq, d_model]``) and, with ``pooled``, ``pooled``
    (``tanh(W @ hidden[:, 0])``, ``[batch, d_model]``). The mask becomes one additive bias
    ``[batch, 1, 1, seq]`` that feeds the attention of every layer. ``seq`` may not exceed ``max_seq``.
    """
    if layers < 1 or d_model < 1 or vocab < 2 or max_seq < 1:
        raise ValueError(
            f"transformer: layers, d_model and max_seq must be >= 1 and vocab >= 2, got layers={layers}, "
            f"d_model={d_model}, vocab={vocab}, max_seq={max_seq}"
        )
    if heads < 1 or d_model % heads:
        raise ValueError(
            f"transformer: d_model ({d_model}) must be a multiple of heads ({heads}), e.g. d_model=64 heads=4"
        )
    ffn = 4 * d_model if ffn is None else ffn
    head_dim = d_model // heads
    g = GraphBuilder(seed)
    c = {
        "split_heads": g.ints("const/split_heads_shape", [0, 0, heads, head_dim]),
        "merge_heads": g.ints("const/merge_heads_shape", [0, 0, d_model]),
        "score_scale": g.scalar("const/score_scale", 1.0 / math.sqrt(head_dim)),
        "inv_sqrt2": g.scalar("const/inv_sqrt2", 1.0 / math.sqrt(2.0)),
        "one": g.scalar("const/one", 1.0),
        "half": g.scalar("const/half", 0.5),
    }

    # Embeddings: token + learned position, then LayerNorm.
    tokens = g.node(
        "Gather",
        [g.normal("embeddings/token.weight", (vocab, d_model), 1.0), "input_ids"],
        "embeddings/token",
        axis=0,
    )
    seq_len = g.node("Shape", ["input_ids"], "embeddings/seq_len", start=1, end=2)
    positions = g.node(
        "Slice",
        [
            g.normal("embeddings/position.weight", (max_seq, d_model), 1.0),
            g.ints("const/zero", [0]),
            seq_len,
            g.ints("const/axis0", [0]),
        ],
        "embeddings/position",
    )
    x = _layer_norm(g, g.node("Add", [tokens, positions], "embeddings/add"), d_model, "embeddings/norm")

    # attention_mask [b, s] -> additive bias [b, 1, 1, s]: 0 where attended, -10000 where padded.
    mask = g.node("Cast", ["attention_mask"], "mask/cast", to=onnx.TensorProto.FLOAT)
    mask = g.node("Sub", [c["one"], mask], "mask/invert")
    mask = g.node("Mul", [mask, g.scalar("const/mask_value", _MASK_VALUE)], "mask/scale")
    bias = g.node("Unsqueeze", [mask, g.ints("const/mask_axes", [1, 2])], "mask/bias")

    gelu_in = Moments(0.0, 1.0).gelu()
    for i in range(layers):
        name = f"layer{i}"
        attn = _attention(g, x, bias, d_model, heads, f"{name}/attention", c)
        x = _layer_norm(
            g, g.node("Add", [x, attn], f"{name}/attention/residual"), d_model, f"{name}/attention/norm"
        )
        h = _gelu(g, g.linear(x, d_model, ffn, f"{name}/ffn/up", Moments(0.0, 1.0)), f"{name}/ffn/gelu", c)
        h = g.linear(h, ffn, d_model, f"{name}/ffn/down", gelu_in, gain=_BRANCH_GAIN)
        x = _layer_norm(g, g.node("Add", [x, h], f"{name}/ffn/residual"), d_model, f"{name}/ffn/norm")

    x = g.rename_output(x, "hidden")
    outputs = [float_input("hidden", ["batch", "seq", d_model])]
    if pooled:
        first = g.node(
            "Gather",
            [x, g.const("const/first_token", np.asarray(0, dtype=np.int64))],
            "pooler/first_token",
            axis=1,
        )
        y = g.gemm(first, d_model, d_model, "pooler/dense", Moments(0.0, 1.0))
        g.rename_output(g.node("Tanh", [y], "pooler/tanh"), "pooled")
        outputs.append(float_input("pooled", ["batch", d_model]))
    return g.model(
        "transformer",
        [int64_input("input_ids", ["batch", "seq"]), int64_input("attention_mask", ["batch", "seq"])],
        outputs,
        doc=f"Transformer encoder (layers={layers}, d_model={d_model}, heads={heads}) with random weights",
        metadata={
            "layerline.example": "transformer",
            "layers": str(layers),
            "d_model": str(d_model),
            "heads": str(heads),
            "vocab": str(vocab),
            "max_seq": str(max_seq),
        },
    )


def token_inputs(
    batch: int,
    rng: np.random.Generator,
    *,
    vocab: int = 30522,
    max_seq: int = 512,
    seq: int | None = None,
    **_size: object,
) -> dict[str, np.ndarray]:
    """Random token ids in ``[1, vocab)`` padded (id 0, mask 0) at the end of each row.

    ``seq`` defaults to ``min(max_seq, 32)``. Row lengths are drawn between ``seq // 2`` and ``seq``, and
    the last row is always padded, so the mask has zeros whenever ``seq > 1``.
    """
    seq = min(max_seq, 32) if seq is None else seq
    if not 1 <= seq <= max_seq:
        raise ValueError(f"seq must be between 1 and max_seq={max_seq}, got {seq}")
    lengths = rng.integers(max(1, seq // 2), seq + 1, size=batch)
    if seq > 1:
        lengths[-1] = min(int(lengths[-1]), seq - 1)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask}
