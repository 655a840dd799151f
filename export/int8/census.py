"""Census: which convolutions and matrix products of an ONNX model onnxruntime really runs in int8.

A QDQ model only states the quantizer's intent. When a CPU session is created, onnxruntime fuses a
DequantizeLinear -> Conv -> QuantizeLinear group into an int8 kernel (QLinearConv, QGemm, ...) only
where it has one for that pattern; every other group stays a float32 Conv between a
DequantizeLinear and a QuantizeLinear, slower than the float32 model. The census reads the graph
onnxruntime writes after its optimizations, so a slow int8 model explains itself: QDQ 16-bit
tensors or unsupported patterns leave convolutions in float32. This module owns that reading: the
operator counts of the optimized graph and the share of the model's multiply-accumulates (MACs)
that run in int8. It never claims more int8 than there is: a layer it cannot map counts as float32.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from math import prod
from pathlib import Path

LAYERS = ("Conv", "MatMul", "Gemm")  # the MAC-bearing layers of the original model
INT8_LAYER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                  "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QOrderedMatMul"}
INT8_OTHER_OPS = {"MulInteger", "ReduceSumInteger", "QEmbedLayerNormalization"}  # and QLinear*
# MatMulNBits: onnxruntime's fusion of an int8 weight's DequantizeLinear into a matrix product
# whose input stays float (16-bit QDQ); it stores the weights in 8 bits and computes in float32.
FLOAT32_OPS = {"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "MatMul", "FusedMatMul",
               "FusedMatMulActivation", "TransposeMatMul", "Gemm", "FusedGemm", "MatMulNBits"}
S8_TO_U8_SUFFIX = "_s8_2_u8"  # onnxruntime's name for an int8 weight it re-encodes as uint8 (AVX2)


def int8_census(model_path: Path, threads: int) -> dict:
    """The int8 and float32 compute operators onnxruntime runs for model_path on CPU, and the share
    of the model's MACs (convolutions and matrix products, per image) that run in int8."""
    import onnx

    optimized = _optimized_graph(Path(model_path), threads)
    int8_ops = [node for node in optimized.node if _is_int8(node.op_type)]
    # A layer is matched to its int8 kernel by weight initializer, not node name: onnxruntime
    # renames the Convs it fuses (Conv__339 becomes QLinearConv Conv__339_token_0; a prefix
    # match would also take it for Conv__33), while the kernel reads the QDQ model's weight
    # initializer unrenamed (`<weight>_quantized`; MobileNetV2: 54 of 54 layers matched, by exact
    # node name 2), or `<weight>_quantized_s8_2_u8` where AVX2 code re-encodes int8 weights.
    # A weight two layers share is no key: both count as float32.
    int8_weights = {name.removesuffix(S8_TO_U8_SUFFIX)
                    for node in int8_ops if node.op_type in INT8_LAYER_OPS for name in node.input}
    layers = _layer_macs(onnx.load(str(model_path)))
    uses = Counter(weight for weight, _ in layers)
    macs = sum(layer_macs for _, layer_macs in layers)
    int8_macs = sum(layer_macs for weight, layer_macs in layers
                    if weight is not None and uses[weight] == 1 and weight in int8_weights)
    return {"int8_operators": _counts(node.op_type for node in int8_ops),
            "float32_operators": _counts(node.op_type for node in optimized.node
                                         if node.op_type in FLOAT32_OPS),
            "int8_mac_share": round(int8_macs / macs, 4) if macs else 0.0,
            "macs": macs}


def _optimized_graph(model_path: Path, threads: int):
    """The graph an onnxruntime CPU session at ORT_ENABLE_ALL really runs for the model."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="census-") as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(Path(scratch, "optimized.onnx"))
        options.log_severity_level = 3  # not the warning that NCHWc graphs are hardware-specific
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath).graph


def _is_int8(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type in INT8_LAYER_OPS | INT8_OTHER_OPS


def _counts(op_types) -> dict[str, int]:
    return dict(sorted(Counter(op_types).items(), key=lambda item: (-item[1], item[0])))


def _layer_macs(model) -> list[tuple[str | None, int]]:
    """(weight initializer or None, MACs per image) of each Conv, MatMul and Gemm of the model.

    The weight is the initializer behind the layer's second input, through its DequantizeLinear
    in a QDQ model. Dimensions shape inference leaves unknown (the dynamic batch) count as 1."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {info.name: [dim.dim_value or None for dim in info.type.tensor_type.shape.dim]
              for info in (*graph.input, *graph.value_info, *graph.output)}
    shapes.update({tensor.name: list(tensor.dims) for tensor in graph.initializer})
    initializers = {tensor.name for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    layers = []
    for node in graph.node:
        if node.op_type not in LAYERS or len(node.input) < 2:
            continue
        weight = node.input[1]
        while weight in producers and producers[weight].op_type == "DequantizeLinear":
            weight = producers[weight].input[0]
        output, second = shapes.get(node.output[0], []), shapes.get(node.input[1], [])
        layers.append((weight if weight in initializers else None,
                       _macs(node, output, second)))
    return layers


def _macs(node, output: list, second: list) -> int:
    """Conv: output positions x weight size. MatMul, Gemm: M x K x N for one image (the output
    without its first, batch dimension, times K)."""
    known = [dim or 1 for dim in output]
    if node.op_type == "Conv":
        return prod(known[2:]) * prod(dim or 1 for dim in second)
    if node.op_type == "Gemm":
        trans_b = any(attr.name == "transB" and attr.i for attr in node.attribute)
        k = second[1 if trans_b else 0] if len(second) == 2 else None
    else:
        k = second[-2] if len(second) >= 2 else (second[0] if second else None)
    return prod(known[1:]) * (k or 1)
