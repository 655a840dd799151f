"""Rounding: GPTQ rounding of a QDQ model's int8 weights on the scales the quantizer chose.

onnxruntime's quantizer rounds every weight to the nearest step of its channel's scale. GPTQ
(Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022; the Optimal Brain Quantizer of Frantar and Alistarh, 2022, taken column by
column) rounds a layer's weights one input column at a time and spreads each rounding error over
the columns not yet rounded, weighted by the inverse of H = sum x x^T over the layer's inputs on
calibration images, so that the layer's outputs on those inputs move as little as they can. The
scales, zero points and integer range stay as quantized (the uint8 recipe's 7-bit range included),
so the graph, its speed and its arithmetic on every CPU are unchanged; only the integers differ.

Written here because no installed tool does it for this graph: onnxruntime's GPTQ
(matmul_nbits_quantizer, through Intel Neural Compressor) rewrites MatMul weights into 4-bit
MatMulNBits, and NNCF's GPTQ compresses the weights of OpenVINO and PyTorch language models; neither
rounds the int8 weights of a QDQ convolution. What it changed, measured: docs/int8.md
(Experiments).
"""
from __future__ import annotations

import numpy as np

DAMPING = 0.01  # GPTQ's: a share of H's mean diagonal added to it, so that H inverts stably
# GPTQ's lazy batch updates: each column's error updates the rest of its block of columns at once,
# and the columns after the block once per block, in one matrix product. The same arithmetic as
# updating every later column after every column, reordered: on VGG16's 4,608-column layers the
# column-by-column updates made the int8 export take 87 s at 32 px.
BLOCK = 128
# GPTQ's reference arithmetic (its PyTorch code factorises and rounds in float32): it rounds as
# well as float64 did, in a third of the factorisation's time (docs/int8.md). Each calibration
# image's H is summed in float64.
ARITHMETIC = np.float32


def gptq(weights: np.ndarray, hessian: np.ndarray, scale: np.ndarray, qmin: int,
         qmax: int) -> np.ndarray:
    """Integers for weights (rows, columns), one scale per row, all rows sharing hessian
    (columns, columns), rounded by GPTQ within [qmin, qmax]."""
    weights = np.array(weights, dtype=ARITHMETIC)
    hessian = np.array(hessian, dtype=ARITHMETIC)
    scale = np.asarray(scale, dtype=ARITHMETIC)
    dead = np.diag(hessian) == 0  # inputs that never fire: their weights do not matter
    hessian[dead, dead] = 1
    weights[:, dead] = 0
    hessian += DAMPING * np.mean(np.diag(hessian)) * np.eye(len(hessian), dtype=ARITHMETIC)
    inverse = upper_cholesky_of_inverse(hessian)
    integers = np.zeros(weights.shape, dtype=np.int64)
    for start in range(0, weights.shape[1], BLOCK):
        end = min(start + BLOCK, weights.shape[1])
        errors = np.zeros((len(weights), end - start), dtype=ARITHMETIC)
        for column in range(start, end):
            integers[:, column] = np.clip(np.round(weights[:, column] / scale), qmin, qmax)
            error = (weights[:, column] - integers[:, column] * scale) / inverse[column, column]
            weights[:, column + 1:end] -= np.outer(error, inverse[column, column + 1:end])
            errors[:, column - start] = error
        weights[:, end:] -= errors @ inverse[start:end, end:]  # the block's errors, at once
    return integers


def upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    """U, upper triangular, with U^T U = hessian^-1: the factor GPTQ rounds by. From one Cholesky
    factorisation of the hessian with its rows and columns reversed (J H J = C C^T, so
    H^-1 = (J C^-1 J)^T (J C^-1 J)) and one triangular inverse: a third of the arithmetic of
    inverting H and factorising the inverse, which took 70 % of VGG16's int8 build at 32 px (its
    4,608-column layers); the build now takes half as long."""
    from scipy import linalg

    factor = linalg.cholesky(hessian[::-1, ::-1], lower=True)
    triangular_inverse = linalg.lapack.get_lapack_funcs("trtri", (factor,))  # strtri, dtrtri
    inverse, info = triangular_inverse(factor, lower=1)
    if info:
        raise np.linalg.LinAlgError(f"singular Cholesky factor (trtri info {info})")
    return np.ascontiguousarray(inverse[::-1, ::-1])


def round_layer(kind: str, weights: np.ndarray, hessian: np.ndarray, scale: np.ndarray,
                qmin: int, qmax: int) -> np.ndarray:
    """The integers of one layer's weights, in their own shape. kind: "conv" (one hessian for
    every output channel), "depthwise" (one per channel) or "dense" (weights (inputs, outputs),
    one scale per output)."""
    if kind == "dense":
        return gptq(weights.T, hessian, scale, qmin, qmax).T
    rows = weights.reshape(len(weights), -1)
    if kind == "depthwise":
        integers = np.stack([gptq(rows[c:c + 1], hessian[c], scale[c:c + 1], qmin, qmax)[0]
                             for c in range(len(rows))])
    else:
        integers = gptq(rows, hessian, scale, qmin, qmax)
    return integers.reshape(weights.shape)


def input_hessian(kind: str, inputs: np.ndarray, kernel: list[int], strides: list[int],
                  pads: list[int]) -> np.ndarray:
    """sum x x^T over the patches a layer reads from inputs (NCHW, or (N, features) for dense),
    in the order of its flattened weights: (features, features), or (channels, k, k) for a
    depthwise convolution."""
    if kind == "dense":
        flat = inputs.reshape(len(inputs), -1).astype(ARITHMETIC)
        return flat.T @ flat
    patches = _patches(inputs, kernel, strides, pads).astype(ARITHMETIC)
    if kind == "depthwise":
        return np.einsum("pci,pcj->cij", patches, patches)
    flat = patches.reshape(len(patches), -1)
    return flat.T @ flat


def _patches(inputs: np.ndarray, kernel: list[int], strides: list[int],
             pads: list[int]) -> np.ndarray:
    """(positions, channels, kh * kw): every window a convolution reads, as it reads it."""
    padded = np.pad(inputs, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1]]
    n, c, rows, cols, kh, kw = windows.shape
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * rows * cols, c, kh * kw)


def round_weights(float_model, quantized, feeds: list[dict], qmin: int, qmax: int) -> int:
    """Rewrites, in place, the int8 weights of the QDQ model `quantized` by GPTQ, with the
    inputs each layer sees in float_model (the graph it was quantized from) on feeds. Returns how
    many layers it rounded."""
    from onnx import numpy_helper

    layers = _int8_layers(float_model, quantized)
    if not layers:
        return 0
    float_weights = {i.name: i for i in float_model.graph.initializer}
    integers = {i.name: i for i in quantized.graph.initializer}
    hessians = _hessians(layers, float_model, feeds)
    for kind, node, dequantize in layers:
        weights = numpy_helper.to_array(float_weights[node.input[1]])
        scale = numpy_helper.to_array(integers[dequantize.input[1]])
        rounded = round_layer(kind, weights, hessians[node.name], scale, qmin, qmax)
        integers[dequantize.input[0]].CopyFrom(
            numpy_helper.from_array(rounded.astype(np.int8), dequantize.input[0]))
    return len(layers)


def _int8_layers(float_model, quantized) -> list[tuple[str, object, object]]:
    """(kind, the float model's node, the weight's DequantizeLinear) for every convolution and
    matrix product whose weights quantized holds as symmetric per-channel int8."""
    from onnx import TensorProto, numpy_helper

    float_nodes = {node.name: node for node in float_model.graph.node}
    initializers = {i.name: i for i in quantized.graph.initializer}
    producers = {output: node for node in quantized.graph.node for output in node.output}
    layers = []
    for node in quantized.graph.node:
        dequantize = producers.get(node.input[1]) if len(node.input) > 1 else None
        if (node.op_type not in ("Conv", "Gemm", "MatMul") or node.name not in float_nodes
                or dequantize is None or dequantize.op_type != "DequantizeLinear"
                or initializers.get(dequantize.input[0]) is None
                or initializers[dequantize.input[0]].data_type != TensorProto.INT8
                or (len(dequantize.input) > 2
                    and numpy_helper.to_array(initializers[dequantize.input[2]]).any())):
            continue
        kind = _kind(float_nodes[node.name], initializers[dequantize.input[0]].dims)
        if kind:
            layers.append((kind, float_nodes[node.name], dequantize))
    return layers


def _kind(node, weight_dims) -> str | None:
    """How a layer's weights are laid out: conv, depthwise or dense; None for layouts not handled
    (grouped, dilated or auto-padded convolutions, transposed dense weights), which keep the
    quantizer's rounding."""
    attributes = _attributes(node)
    if node.op_type == "Conv":
        if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"") or \
                set(attributes.get("dilations", [1])) != {1}:
            return None  # windows read otherwise than input_hessian's
        groups = attributes.get("group", 1)
        if groups == 1:
            return "conv"
        return "depthwise" if weight_dims[1] == 1 and groups == weight_dims[0] else None
    return None if attributes.get("transB", 0) else "dense"


def _attributes(node) -> dict:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _hessians(layers, float_model, feeds: list[dict]) -> dict[str, np.ndarray]:
    """Each layer's input_hessian, summed over the feeds, by node name."""
    names = sorted({node.input[0] for _, node, _ in layers})
    session = intermediate_session(float_model, names)
    hessians: dict[str, np.ndarray] = {}
    windows = {node.name: _windows(node) for _, node, _ in layers}
    for feed in feeds:
        values = dict(zip(names, session.run(names, feed)))
        for kind, node, _ in layers:
            hessian = input_hessian(kind, values[node.input[0]], *windows[node.name])
            hessians[node.name] = hessians.get(node.name, 0) + hessian.astype(np.float64)
    return hessians


def _windows(node) -> tuple[list[int], list[int], list[int]]:
    """A layer's kernel shape, strides and pads, as input_hessian takes them."""
    attributes = _attributes(node)
    return (list(attributes.get("kernel_shape", [1, 1])), list(attributes.get("strides", [1, 1])),
            list(attributes.get("pads", [0, 0, 0, 0])))


def intermediate_session(model, names: list[str]):
    """A CPU session of a copy of model that also outputs the named intermediate tensors."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {output.name for output in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.add().name = name
    return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
