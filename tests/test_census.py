"""export.int8.census on tiny models: a float32 one, its U8S8 QDQ quantization, and a 16-bit one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from export.int8.census import int8_census

# Conv 3->8 3x3 on 8x8: 64 positions x 216 weights; Conv 8->8 1x1: 64 x 64; Gemm 8->4: 32.
TINY_MACS = 64 * 8 * 3 * 3 * 3 + 64 * 8 * 8 + 8 * 4


def tiny_model(opset: int = 17) -> onnx.ModelProto:
    """image [N, 3, 8, 8] -> Conv 3x3 -> Relu -> Conv 1x1 -> Relu -> GlobalAveragePool -> Gemm."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
               "w2": rng.normal(0, 0.3, (8, 8, 1, 1)), "b2": rng.normal(0, 0.1, 8),
               "w3": rng.normal(0, 0.3, (8, 4)), "b3": rng.normal(0, 0.1, 4)}
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], "pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
             helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], "head")]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(value.astype(np.float32), name)
         for name, value in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


class RandomImages(CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(1)
        self.batches = iter([{"image": rng.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)}
                             for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def quantized(tmp_path, model, activation_type, name):
    source, target = tmp_path / f"{name}.float.onnx", tmp_path / f"{name}.onnx"
    onnx.save(model, str(source))
    quantize_static(str(source), str(target), RandomImages(), quant_format=QuantFormat.QDQ,
                    activation_type=activation_type, weight_type=QuantType.QInt8, per_channel=True)
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("census")
    float32 = folder / "float32.onnx"
    onnx.save(tiny_model(), str(float32))
    sixteen = onnx.version_converter.convert_version(tiny_model(), 21)
    return {"float32": float32,
            "u8s8": quantized(folder, tiny_model(), QuantType.QUInt8, "u8s8"),
            "u16s8": quantized(folder, sixteen, QuantType.QUInt16, "u16s8")}


def test_float32_model_has_no_int8_share_and_counts_its_convolutions(models):
    census = int8_census(models["float32"], threads=1)
    assert census["int8_mac_share"] == 0
    assert census["int8_operators"] == {}
    assert census["float32_operators"].get("Conv") == 2


def test_macs_are_per_image_products_of_output_and_weight_sizes(models):
    assert int8_census(models["float32"], threads=1)["macs"] == TINY_MACS


def test_u8s8_qdq_model_runs_its_convolutions_in_int8(models):
    census = int8_census(models["u8s8"], threads=1)
    assert census["int8_operators"].get("QLinearConv") == 2
    assert "Conv" not in census["float32_operators"]
    assert census["int8_mac_share"] > 0.9
    assert census["macs"] == TINY_MACS


def test_sixteen_bit_activations_leave_convolutions_in_float32(models):
    census = int8_census(models["u16s8"], threads=1)
    assert census["float32_operators"].get("Conv") == 2
    assert "QLinearConv" not in census["int8_operators"]
    assert census["int8_mac_share"] < 0.01


def test_a_layer_it_cannot_map_counts_as_float32(tmp_path, models):
    model = onnx.load(str(models["u8s8"]))
    index, conv1 = next((index, node) for index, node in enumerate(model.graph.node)
                        if node.name == "conv1")
    # An Identity between conv1 and its DequantizeLinear hides the weight initializer.
    weight, conv1.input[1] = conv1.input[1], "hidden"
    model.graph.node.insert(index, helper.make_node("Identity", [weight], ["hidden"]))
    onnx.save(model, str(tmp_path / "hidden.onnx"))
    census = int8_census(tmp_path / "hidden.onnx", threads=1)
    assert census["int8_mac_share"] == pytest.approx(1 - 64 * 8 * 3 * 3 * 3 / TINY_MACS, abs=1e-4)
