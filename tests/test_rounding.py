"""export.int8.rounding: GPTQ rounding of int8 weights, on small problems whose answer is known."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.int8.rounding import gptq, input_hessian, round_layer

SEVEN_BITS = (-64, 64)


def _correlated_inputs(rng, samples: int, features: int) -> np.ndarray:
    """Inputs whose features move together, as a layer's channels do."""
    return rng.normal(size=(samples, features // 4)) @ rng.normal(size=(features // 4, features)) \
        + 0.1 * rng.normal(size=(samples, features))


def test_gptq_moves_a_layers_outputs_much_less_than_rounding_to_nearest():
    rng = np.random.default_rng(0)
    inputs = _correlated_inputs(rng, 4000, 64)
    weights = rng.normal(size=(16, 64))
    scale = np.abs(weights).max(axis=1) / 64
    nearest = np.clip(np.round(weights / scale[:, None]), *SEVEN_BITS)
    rounded = gptq(weights, inputs.T @ inputs, scale, *SEVEN_BITS)

    def output_error(integers):
        return np.sum((inputs @ weights.T - inputs @ (integers * scale[:, None]).T) ** 2)
    assert output_error(rounded) < 0.5 * output_error(nearest)  # measured: 0.16
    # The same grid: it changes a fifth of the roundings, mostly by one step (measured: 20 %).
    assert 0 < (rounded != nearest).mean() < 0.4


def test_gptq_keeps_every_integer_in_the_weights_range():
    rng = np.random.default_rng(1)
    inputs = _correlated_inputs(rng, 500, 32)
    weights = rng.normal(size=(8, 32))
    scale = np.abs(weights).max(axis=1) / 64 / 2  # half the range: half the weights would overflow
    rounded = gptq(weights, inputs.T @ inputs, scale, *SEVEN_BITS)
    assert rounded.min() == SEVEN_BITS[0] and rounded.max() == SEVEN_BITS[1]


def test_inputs_that_never_fire_get_zero_weights_and_the_rest_still_rounds():
    rng = np.random.default_rng(2)
    inputs = _correlated_inputs(rng, 500, 16)
    inputs[:, 3] = 0  # a channel a ReLU always zeroes
    weights = rng.normal(size=(4, 16))
    scale = np.abs(weights).max(axis=1) / 64
    rounded = gptq(weights, inputs.T @ inputs, scale, *SEVEN_BITS)
    assert not rounded[:, 3].any() and np.isfinite(rounded).all() and rounded.any()


def _convolution(weights: np.ndarray, groups: int, strides: list[int], pads: list[int]):
    """A one-convolution ONNX model, for checking input_hessian against onnxruntime's own Conv."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=groups, strides=strides, pads=pads,
                            kernel_shape=list(weights.shape[2:]))
    graph = helper.make_graph([node], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("strides, pads", [([1, 1], [1, 1, 1, 1]), ([2, 2], [0, 0, 1, 1])])
def test_input_hessian_reads_the_windows_a_convolution_reads(strides, pads):
    """w H w^T is the sum of squares of the convolution's output: H's patches are laid out as the
    flattened weights are, for a full and a depthwise 3x3 convolution."""
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(2, 4, 9, 9)).astype(np.float32)
    full = rng.normal(size=(1, 4, 3, 3))
    output = _convolution(full, 1, strides, pads).run(None, {"x": inputs})[0]
    hessian = input_hessian("conv", inputs, [3, 3], strides, pads)
    flat = full.reshape(1, -1)
    assert (flat @ hessian @ flat.T)[0, 0] == pytest.approx(np.sum(output.astype(np.float64) ** 2),
                                                            rel=1e-4)
    depthwise = rng.normal(size=(4, 1, 3, 3))
    output = _convolution(depthwise, 4, strides, pads).run(None, {"x": inputs})[0]
    hessians = input_hessian("depthwise", inputs, [3, 3], strides, pads)
    for channel in range(4):
        w = depthwise[channel].reshape(1, -1)
        assert (w @ hessians[channel] @ w.T)[0, 0] == pytest.approx(
            np.sum(output[:, channel].astype(np.float64) ** 2), rel=1e-4)


def test_dense_weights_are_rounded_per_output_column():
    rng = np.random.default_rng(4)
    inputs = _correlated_inputs(rng, 300, 12)
    weights = rng.normal(size=(12, 5))  # (inputs, outputs), as a Gemm without transB holds them
    scale = np.abs(weights).max(axis=0) / 64
    rounded = round_layer("dense", weights, input_hessian("dense", inputs, [], [], []), scale,
                          *SEVEN_BITS)
    assert rounded.shape == weights.shape
    assert np.abs(rounded * scale - weights).max() <= 3 * scale.max()
