"""Quantize: static int8 quantization (QDQ, per-channel weights) calibrated on training images.

Steps: quant_pre_process (ONNX shape inference; BatchNorm folded into the convolutions),
quantize_static with percentile or MinMax calibration (per recipe) over images of the run's
training split (decoded exactly as in training), then GPTQ rounding of the int8 weights
(export.int8.rounding) and empirical bias correction. Two recipes, in RECIPES, fastest first; the
export keeps the first one that passes the int8 gate (accept, from export.formats), and the last
one otherwise; a recipe that cannot be built counts as one that did not pass.

Why these recipes (the measurements behind them are in docs/int8.md, Experiments): `uint8` keeps
every layer but the stem and the classifier head in int8, with uint8 activations and 7-bit
weights, because that is onnxruntime's fast path on x86 (U8S8 kernels, one scale per activation
tensor) and most of the int8 network's error arises in the stem. `mixed_16bit`, the accurate
fallback, gives 16 bits where 8 cost labels and buy no speed: short convolution weights,
unbounded activations, and the activations of layers that run in float32 anyway. Bias correction
(Nagel et al., "Data-Free Quantization", 2019, empirical form) takes out of each convolution's
int32 bias, in graph order, the shift of its output's mean that rounding causes, which in
networks such as MobileNetV2 compounds through the layers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from common.progress import Progress
from export import convert
from export.convert import INPUT_NAME
from export.errors import ExportError
from export.int8 import rounding

log = logging.getLogger("export")

CORRECTION_IMAGES = 64  # of the calibration images: GPTQ's inputs and bias correction's
ACTIVATIONS = ("Relu", "Clip")  # bound a layer's output; the quantizer folds them into its range
SAME_PRECISION_AS_INPUT = ACTIVATIONS + ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")
SHORT_WEIGHTS_PER_CHANNEL = 32  # convolution weights this short per output channel get 16 bits
SIXTEEN_BIT_OPSET = 21  # the first opset whose QuantizeLinear takes 16-bit integers


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One way to quantize: its activation integers, the tensors it gives 16 bits and the layers it
    keeps in float32."""

    name: str
    method: str  # for the report and the model's metadata
    activations: str  # onnxruntime.quantization.QuantType member name
    seven_bit_weights: bool  # quantize_static's reduce_range: see UINT8
    calibration: str  # onnxruntime.quantization.CalibrationMethod member name: see UINT8
    calibration_options: dict  # quantize_static's extra_options for it ({} for MinMax)
    overrides: Callable[[Any], dict]  # prepared graph -> quantize_static's TensorQuantOverrides
    float32_layers: Callable[[Any], list[str]]  # prepared graph -> quantize_static's nodes_to_exclude


# Seven-bit weights (reduce_range): on x86 CPUs without VNNI (AVX2, AVX-512F) onnxruntime's U8S8
# kernels sum pairs of uint8 x int8 products in 16 bits (VPMADDUBSW), which saturate with 8-bit
# weights; with 7-bit weights they cannot (255 * 63 * 2 < 2**15), so the int8 model computes the
# same labels on every x86 CPU, as onnxruntime's quantization guide advises. Measured on a fine-
# tuned clothing10 MobileNetV2 (372 test images, AMD EPYC with AVX2 only): 8-bit weights agreed
# with float32 on 93.5 % of the labels, 95.4 % with the QDQ graph run unfused (exact integer
# arithmetic, as on VNNI); 7-bit weights 97.0 % and 96.8 %. The same 7-bit files, run on an Intel
# Xeon with AVX-512 VNNI and AMX, gave outputs identical to the last bit (clothing10 and
# intel_scenes runs); the 8-bit file changed 6.2 % of its labels between the two CPUs.
#
# Percentile calibration (each activation's range cut to its central 99.99 % on the calibration
# images, instead of MinMax's extremes): a finer grid for the bulk of every tensor, a few outliers
# clipped. On the seed-42 default runs of the three data sets, five calibration samples each,
# every test image (README, Edge export): flips against float32 40 -> 30 on intel_scenes,
# 23 -> 20 on chest X-ray, 30 -> 25 on clothing10, the mean probability error down 7 % to 9 %;
# 99.999 % and entropy calibration did no better than MinMax.
UINT8 = Recipe("uint8", "static QDQ, percentile (99.99) calibration, per-channel 7-bit int8 "
               "weights, uint8 activations, every layer in int8 but the stem and the classifier "
               "head; GPTQ weight rounding; empirical bias correction",
               activations="QUInt8", seven_bit_weights=True, calibration="Percentile",
               calibration_options={"CalibPercentile": 99.99}, overrides=lambda graph: {},
               float32_layers=lambda graph: stem_layers(graph) + head_layers(graph))
MIXED_16BIT = Recipe("mixed_16bit", "static QDQ, MinMax calibration, per-channel int8 weights and "
                     "int8 activations at layers that run in int8; 16-bit short convolution weights "
                     "(at most 32 per channel), unbounded activations and activations of layers "
                     "that run in float32; GPTQ weight rounding; empirical bias correction",
                     activations="QInt8", seven_bit_weights=False, calibration="MinMax",
                     calibration_options={},
                     overrides=lambda graph: sixteen_bit_overrides(graph),
                     float32_layers=lambda graph: [])
RECIPES = (UINT8, MIXED_16BIT)  # fastest first


class ImageReader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader over image files, in small batches. onnxruntime pulls
    the images, so the progress of calibration is counted here; used as `with ImageReader(...)`,
    it may draw a live bar (common.progress), removed when the block ends."""

    def __init__(self, paths: list[str], image_size: int, batch_size: int = 16):
        self.paths, self.image_size, self.batch_size = list(paths), image_size, batch_size
        self.progress: Progress | None = None
        self.rewind()

    def __len__(self) -> int:
        """Batches: the unit of quantize_static's CalibStridedMinMax (see _quantize)."""
        return math.ceil(len(self.paths) / self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Reads the batches from start_index up to end_index next (CalibStridedMinMax), the
        progress counting on."""
        self.position = start_index * self.batch_size
        self.end = min(end_index * self.batch_size, len(self.paths))

    def __enter__(self) -> "ImageReader":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.close()

    def get_next(self) -> dict | None:
        from edge.images import load_images

        if self.position >= self.end:
            return None
        chunk = self.paths[self.position:self.position + self.batch_size]
        self.position += len(chunk)
        self.progress.advance(len(chunk))
        return {INPUT_NAME: load_images(chunk, self.image_size)}

    def rewind(self) -> None:
        """Back to the first image, counting afresh (inside the block, if the last count was)."""
        self.position, self.end = 0, len(self.paths)
        in_block = self.progress is not None and self.progress.in_block
        if self.progress is not None:
            self.progress.close()
        self.progress = Progress("calibration", len(self.paths), "images", log)
        if in_block:
            self.progress.__enter__()


def quantize_int8(float_model: Path, int8_model: Path, calibration_paths: list[str],
                  image_size: int, recipes: tuple[Recipe, ...] = RECIPES,
                  accept: Callable[[Path], tuple[bool, dict]] | None = None,
                  bias_correction: bool = True) -> dict:
    """Writes int8_model by the first of recipes that accept takes (given the model's path, it
    answers whether to keep it, and the figures it judged by), else by the last one. A recipe
    that cannot be built (ExportError) is passed over, its error kept in the notes, unless it is
    the last. Without accept the first recipe is kept.

    Returns what was done, for the report: the recipe kept, and the figures of each one tried."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_paths:
        raise ExportError("no training images to calibrate the int8 model on")
    tried = {}
    with tempfile.TemporaryDirectory(prefix="quant-") as scratch:
        prepared = Path(scratch, "prepared.onnx")
        try:
            quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        except Exception as error:  # optional step: quantization works without it
            log.warning("quant_pre_process failed (%s); quantizing the graph as converted", error)
            shutil.copyfile(float_model, prepared)
        for recipe in recipes:
            try:
                rounded, corrected = _build(recipe, prepared, int8_model, calibration_paths,
                                            image_size, bias_correction)
            except ExportError as error:
                if recipe is recipes[-1]:
                    raise
                # A recipe that cannot be built is one that failed: the next one may build
                # (percentile calibration fails on a tensor whose values span fewer float32
                # steps than its histogram has bins; see quantized_op_types).
                log.warning("int8 recipe %s could not be built (%s); trying the next one",
                            recipe.name, error)
                tried[recipe.name] = {"error": str(error)}
                continue
            accepted, tried[recipe.name] = accept(int8_model) if accept else (True, {})
            log.info("int8 recipe %s: %s%s", recipe.name, "kept" if accepted else "not kept",
                     f" {tried[recipe.name]}" if tried[recipe.name] else "")
            if accepted:
                break
    log.info("int8 model (%s) calibrated on %d training images; weights of %d layers rounded by "
             "GPTQ, biases of %d convolutions corrected", recipe.name, len(calibration_paths),
             rounded, corrected)
    correction_images = min(len(calibration_paths), CORRECTION_IMAGES)
    return {"recipe": recipe.name, "method": recipe.method, "tried": tried,
            "calibration_images": len(calibration_paths),
            "gptq_rounded_layers": rounded, "gptq_images": correction_images,
            "bias_corrected_convolutions": corrected,
            "bias_correction_images": correction_images if bias_correction else 0}


def _build(recipe: Recipe, prepared: Path, output: Path, calibration_paths: list[str],
           image_size: int, bias_correction: bool) -> tuple[int, int]:
    """Quantizes the prepared graph by recipe into output, rounds its int8 weights by GPTQ
    (export.int8.rounding) and corrects its biases; returns how many layers it rounded and how many
    biases it corrected."""
    import onnx

    graph = onnx.load(str(prepared))
    overrides, float32_layers = recipe.overrides(graph), recipe.float32_layers(graph)
    if overrides and convert.opset_of(graph) < SIXTEEN_BIT_OPSET:
        graph = onnx.version_converter.convert_version(graph, SIXTEEN_BIT_OPSET)
        prepared = prepared.with_name(f"{prepared.stem}-opset{SIXTEEN_BIT_OPSET}.onnx")
        onnx.save(graph, str(prepared))
    _quantize(prepared, output, calibration_paths, image_size, recipe, overrides, float32_layers,
              quantized_op_types(graph, float32_layers))
    quantized = onnx.load(str(output))
    feeds = list(_batches(calibration_paths[:CORRECTION_IMAGES], image_size))  # decoded once
    rounded = rounding.round_weights(graph, quantized, feeds, *weight_range(recipe))
    corrected = correct_biases(graph, quantized, feeds) if bias_correction else 0
    onnx.save(quantized, str(output))
    return rounded, corrected


def weight_range(recipe: Recipe) -> tuple[int, int]:
    """The integers quantize_static gives the recipe's symmetric int8 weights: [-64, 64] with seven
    bits, [-127, 127] with eight."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=recipe.seven_bit_weights,
                                         symmetric=True)
    return int(qmin), int(qmax)


def _quantize(model: Path, output: Path, calibration_paths: list[str], image_size: int,
              recipe: Recipe, overrides: dict, float32_layers: list[str],
              op_types: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # One batch per calibration step (CalibStridedMinMax, which despite its name steps every
    # calibrator): a histogram calibrator otherwise keeps every activation of every image in
    # memory until the end (gigabytes for 300 images) and stacks the batches into one
    # array, which fails when the last batch is shorter
    # (microsoft/onnxruntime#18792). Histograms and MinMax ranges merge exactly across steps.
    # Its calibrators print their progress to stdout, which is not the log stream: silenced.
    options = {"TensorQuantOverrides": overrides, "CalibStridedMinMax": 1,
               **recipe.calibration_options}
    try:
        with ImageReader(calibration_paths, image_size) as reader, \
                contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(model), str(output), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType[recipe.activations], weight_type=QuantType.QInt8,
                reduce_range=recipe.seven_bit_weights,
                op_types_to_quantize=op_types,
                nodes_to_exclude=float32_layers,
                calibrate_method=CalibrationMethod[recipe.calibration],
                extra_options=options)
    except Exception as error:
        raise ExportError(f"int8 quantization failed: {error.__class__.__name__}: "
                          f"{str(error).splitlines()[0][:300]}") from None


def quantized_op_types(model, float32_layers: list[str]) -> list[str]:
    """The operator types for quantize_static to quantize: those it can, less the types whose every
    node stays in float32. It calibrates the inputs and outputs of every node of these types, so
    this keeps the tensors of the float32 head's own operator types out of calibration, and the
    quantized graph is the same. The classifier's output probabilities are such a tensor (its
    Sigmoid or Softmax is the only one in most backbones), and percentile calibration fails on a
    batch whose values span fewer float32 steps than its 2,048 histogram bins ("Too many bins for
    data range"): a random-weight VGG16 gave 0.50059 to 0.50060 over a batch of 16, and a
    confident model's probabilities near 1 can do the same."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    excluded = set(float32_layers)
    quantizable = set(QDQRegistry) | set(QLinearOpsRegistry)
    return sorted({node.op_type for node in model.graph.node
                   if node.op_type in quantizable and node.name not in excluded})


def sixteen_bit_overrides(model) -> dict:
    """quantize_static's TensorQuantOverrides giving 16 bits to short convolution weights, to
    unbounded activations, and to every activation no int8 layer reads or writes (see the module
    docstring)."""
    from onnxruntime.quantization import QuantType

    initializers = {i.name: i for i in model.graph.initializer}
    consumers = _consumers(model)
    layers = _layers(model)
    short_weights = {node.input[1] for node in layers if node.op_type == "Conv" and
                     np.prod(initializers[node.input[1]].dims[1:]) <= SHORT_WEIGHTS_PER_CHANNEL}
    unbounded = _unbounded_outputs(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    eight_bit = set()
    for layer in layers[1:]:  # the first layer reads the normalised image: it stays float32
        if layer.input[1] in short_weights or {layer.input[0], layer.output[0]} & unbounded:
            continue  # it runs in float32
        activated = [c.output[0] for c in consumers.get(layer.output[0], [])
                     if c.op_type in ACTIVATIONS]
        for tensor in (layer.input[0], layer.output[0], *activated):
            # The quantizer gives a ReLU or a reshape its input's precision: walk back through them.
            while tensor not in eight_bit:
                eight_bit.add(tensor)
                producer = producers.get(tensor)
                if producer is None or producer.op_type not in SAME_PRECISION_AS_INPUT:
                    break
                tensor = producer.input[0]
    activations = [i.name for i in model.graph.input if i.name not in initializers] + \
        [output for node in model.graph.node for output in node.output]
    overrides = {name: [{"quant_type": QuantType.QInt16}]
                 for name in activations if name not in eight_bit}
    for weight in short_weights:
        channels = initializers[weight].dims[0]
        overrides[weight] = [{"quant_type": QuantType.QInt16, "axis": 0}] + \
            [{"quant_type": QuantType.QInt16}] * (channels - 1)
    return overrides


def stem_layers(model) -> list[str]:
    """The layers the uint8 recipe keeps in float32: the first, which reads the normalised image
    (an int8 grid over it does not line up with the image's 256 levels), and, where the network's
    first block ends in a linear bottleneck at the first layer's resolution (MobileNetV2's first
    three convolutions), every layer up to it. There the tensors are the largest and have the
    fewest channels (16 and 8 on MobileNetV2 0.5), so one int8 scale per tensor costs the most,
    and the block is 9 % of the multiply-accumulates (the module docstring gives the figures).
    VGG16 keeps only its first convolution in float32."""
    layers, unbounded = _layers(model), _unbounded_outputs(model)
    shapes = {info.name: [dim.dim_value for dim in info.type.tensor_type.shape.dim]
              for info in model.graph.value_info}
    resolution = shapes.get(layers[0].output[0], [])[2:]
    if not resolution:  # shapes unknown (quant_pre_process failed): the first layer alone
        return [layers[0].name]
    for end, layer in enumerate(layers[1:], start=2):
        if shapes.get(layer.output[0], [])[2:] != resolution:
            break
        if layer.output[0] in unbounded:
            return [node.name for node in layers[:end]]
    return [layers[0].name]


def head_layers(model) -> list[str]:
    """The nodes the uint8 recipe keeps in float32 at the end of the network: the classifier after
    the last convolution and its activation (pooling, dense layers, softmax or sigmoid). With the
    default linear head they are under a ten-thousandth of MobileNetV2's multiply-accumulates
    (0.3 % with a hidden layer of 256), but in uint8 one scale per tensor rounds the
    pooled features, the logits and the output probabilities themselves (to steps of 1/255), right
    where labels are decided. Measured on the three real data sets (five calibration samples
    each, full test splits, with GPTQ): flipped labels 46 to 40 on intel_scenes, 34 to 30 on
    clothing10, 21 to 23 on chest X-ray; the mean probability error fell on all three (by 3 % to
    14 %) at the same speed."""
    nodes = list(model.graph.node)
    convolutions = [index for index, node in enumerate(nodes) if node.op_type == "Conv"]
    if not convolutions:
        return []
    head = nodes[convolutions[-1] + 1:]
    while head and head[0].op_type in ACTIVATIONS:  # fused into the last convolution
        head = head[1:]
    return [node.name for node in head]


def _layers(model) -> list:
    """The convolutions and matrix products with constant weights, in graph order."""
    initializers = {i.name for i in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type in ("Conv", "MatMul", "Gemm")
            and len(node.input) > 1 and node.input[1] in initializers]


def _unbounded_outputs(model) -> set[str]:
    """Outputs of layers and residual Adds that no ReLU bounds (linear bottlenecks, logits)."""
    consumers = _consumers(model)
    return {node.output[0] for node in model.graph.node
            if node.op_type in ("Conv", "MatMul", "Gemm", "Add")
            and not any(c.op_type in ACTIVATIONS for c in consumers.get(node.output[0], []))}


def _consumers(model) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def correct_biases(float_model, quantized, feeds: list[dict]) -> int:
    """Adjusts the int32 biases of the QDQ model `quantized` in place, convolution by convolution
    in graph order, so that each one's per-channel output mean on these images (feeds, batches of
    the model's input) matches the float model's. Returns how many convolutions were corrected."""
    from onnx import numpy_helper

    producers = {output: node for node in quantized.graph.node for output in node.output}
    consumers = _consumers(quantized)
    initializers = {i.name: i for i in quantized.graph.initializer}
    float_tensors = {output for node in float_model.graph.node for output in node.output}
    convs = []
    for node in quantized.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or node.output[0] not in float_tensors:
            continue
        bias = producers.get(node.input[2])
        if bias is not None and bias.op_type == "DequantizeLinear" and bias.input[0] in initializers:
            convs.append((node, bias))
    if not convs:
        return 0

    def seen(name: str) -> str:
        """The value later nodes see: after the tensor's QuantizeLinear/DequantizeLinear pair.
        (The quantizer drops a Relu/Clip whose range the pair already enforces, so the float
        model's tensor of that name is the clipped one.)"""
        for quantize in consumers.get(name, []):
            if quantize.op_type == "QuantizeLinear":
                for dequantize in consumers.get(quantize.output[0], []):
                    if dequantize.op_type == "DequantizeLinear":
                        return dequantize.output[0]
        return name

    reference = channel_means(float_model, [node.output[0] for node, _ in convs], feeds)
    for node, bias_node in convs:
        observed = seen(node.output[0])
        shift = channel_means(quantized, [observed], feeds)[observed] - reference[node.output[0]]
        scale = numpy_helper.to_array(initializers[bias_node.input[1]]).astype(np.float64)
        bias = numpy_helper.to_array(initializers[bias_node.input[0]]).astype(np.int64)
        bias = np.clip(bias - np.round(shift / scale), -2**31, 2**31 - 1).astype(np.int32)
        initializers[bias_node.input[0]].CopyFrom(numpy_helper.from_array(bias, bias_node.input[0]))
    return len(convs)


def channel_means(model, names: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Per-channel means (over images and positions) of the named NCHW tensors of a model."""
    session = rounding.intermediate_session(model, names)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            total = value.astype(np.float64).sum(axis=(0, 2, 3)) / (value.shape[2] * value.shape[3])
            sums[name] = sums.get(name, 0) + total
        count += len(feed[INPUT_NAME])
    return {name: total / count for name, total in sums.items()}


def _batches(paths: list[str], image_size: int):
    reader = ImageReader(paths, image_size)
    while (feed := reader.get_next()) is not None:
        yield feed
