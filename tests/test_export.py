"""python -m export: gated float32/int8 ONNX exports of real training runs, and its failure modes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.int8.quantize import MIXED_16BIT, RECIPES, UINT8
from tests.conftest import EXPORT_SETTINGS, export_run, gate_outputs, run_in_process, run_record


def _assert_gates_passed(report: dict) -> None:
    assert report["status"] == "passed", report["failed_gates"]
    parity = report["parity"]
    assert parity["images"] == parity["test_split_images"] == 300  # every real test image
    assert parity["float32"]["max_abs_diff"] <= 1e-4
    assert parity["float32"]["top1_agreement"] == 1.0
    assert report["gates"]["int8"] == {"top1_agreement": float(EXPORT_SETTINGS["INT8_MIN_AGREEMENT"]),
                                       "max_accuracy_difference": 0.04}
    assert parity["int8"]["top1_agreement"] >= 0.94
    assert abs(parity["accuracy"]["onnx_int8"] - parity["accuracy"]["onnx_float32"]) <= 0.04
    for backend in ("tensorflow", "onnx_float32", "onnx_int8"):
        assert report["latency"][backend]["batch1_p50_ms"] > 0
        assert report["latency"][backend]["batch32_images_per_s"] > 0
    assert report["latency_settings"]["cpu"]  # int8's speed depends on it (VNNI, AMX)
    assert set(report["files"]) == {"model.onnx", "model.int8.onnx"}
    assert report["sizes_bytes"]["model.int8.onnx"] < report["sizes_bytes"]["model.onnx"]


def test_vgg16_run_exported_by_the_job_passes_the_gates(vgg16_exported_by_job):
    report = json.loads((vgg16_exported_by_job / "export_report.json").read_text())
    _assert_gates_passed(report)
    assert report["parity"]["reference"] == "tensorflow"  # the SavedModel itself
    for name in ("model.onnx", "model.int8.onnx"):
        onnx.checker.check_model(str(vgg16_exported_by_job / name))


def test_mobilenet_v2_with_real_weights_passes_the_gates(mobilenet_export, mobilenet_run):
    code, report, stderr = mobilenet_export
    assert code == 0, stderr[-2000:]
    _assert_gates_passed(report)
    assert report["parity"]["accuracy"]["tensorflow"] >= 0.65  # chance is 0.5; 0.74 measured
    for name in ("model.onnx", "model.int8.onnx"):
        assert (mobilenet_run / name).exists()


# (recipe, how near the decision threshold float32 must be for a label to flip, mean probability
# error, share of labels flipped) each must stay under. Measured, mixed_16bit on AVX-512: 0.017,
# 0.0055 and 1.3 % (4 of 300); on AMX 0.001, 0.0065 and 0.3 %. uint8 (7-bit weights, stem in
# float32) on AVX2: 0.21, 0.024 and 3.3 % (10 of 300), with a largest probability error of 0.23,
# so a flip up to about 0.2 from the threshold is chance, not a regression; on AMX: 0.055, 0.022
# and 2.7 % (8 of 300), largest error 0.12, and with percentile calibration (as landed) 0.083,
# 0.020 and 2.0 % (6 of 300), largest error 0.15.
RECIPE_LIMITS = [(MIXED_16BIT, 0.15, 0.02, 0.04), (UINT8, 0.3, 0.05, 0.07)]
# The model trained on each CPU differs, and so does the threshold chosen on its validation split:
# on AMX it sat at 0.27, so no image below it could be 0.3 away, and 101 of 300 were that far
# (150 and more on AVX2 and AVX-512). A quarter of the images far from it keeps the first
# assertion meaningful on each of them.
MIN_FAR_SHARE = 0.25


@pytest.mark.parametrize("recipe, confident, max_mean_error, max_flipped", RECIPE_LIMITS,
                         ids=lambda value: getattr(value, "name", str(value)))
def test_mobilenet_v2_int8_moves_no_confident_label_and_little_probability(
        recipe, confident, max_mean_error, max_flipped, mobilenet_run, mobilenet_onnx, xray_small,
        tmp_path):
    """What each int8 recipe must do on any CPU, with margins over what was measured: labels flip
    (one image aside, so that no single image is the verdict) only where float32 itself is within
    the recipe's `confident` distance of the decision threshold, and the mean probability error
    and share of labels flipped stay under its limits."""
    from edge.images import load_images
    from edge.runtime import cpu_session
    from export import measure
    from export.int8.quantize import quantize_int8
    from export.pipeline import sample
    from job.inputs import data

    metrics = json.loads((mobilenet_run / "metrics.json").read_text())
    threshold = metrics["decision_threshold"]
    dataset = data.load_dataset(xray_small, 96, 0.2, 0.1, seed=42)
    calibration = sample(dataset.train, 40, seed=43)  # as the export draws them
    quantize_int8(mobilenet_onnx, tmp_path / "int8.onnx", calibration.paths, 96,
                  recipes=(recipe,))
    images = load_images(dataset.test.paths, 96)
    float32, int8 = (measure.predict_all(measure.onnx_predictor(cpu_session(path, 2)),
                                         images, path.name)[:, 0]
                     for path in (mobilenet_onnx, tmp_path / "int8.onnx"))
    far = np.abs(float32 - threshold) >= confident
    flipped = (float32 >= threshold) != (int8 >= threshold)
    assert len(images) == 300 and far.mean() >= MIN_FAR_SHARE
    assert (flipped & far).sum() <= 1, float32[flipped & far]
    assert np.abs(int8 - float32).mean() < max_mean_error
    assert flipped.mean() <= max_flipped


def test_int8_is_quantized_by_the_first_recipe_accepted_else_by_the_last(mobilenet_onnx,
                                                                           xray_small, tmp_path):
    from export.int8.quantize import quantize_int8

    calibration = sorted(str(p) for p in (xray_small / "train").glob("*/*"))[::20]
    seen = []

    def refuse(candidate):
        seen.append(onnx.load(str(candidate)))
        return False, {"top1_agreement": 0.5}

    notes = quantize_int8(mobilenet_onnx, tmp_path / "int8.onnx", calibration, 96,
                          accept=refuse)
    assert [r.name for r in RECIPES] == ["uint8", "mixed_16bit"]  # fastest first
    assert notes["recipe"] == "mixed_16bit" and list(notes["tried"]) == ["uint8", "mixed_16bit"]
    assert notes["tried"]["uint8"] == {"top1_agreement": 0.5}
    kept = onnx.load(str(tmp_path / "int8.onnx"))
    assert kept.graph == seen[-1].graph and kept.graph != seen[0].graph
    notes = quantize_int8(mobilenet_onnx, tmp_path / "int8.onnx", calibration, 96,
                          accept=lambda candidate: (True, {}))
    assert notes["recipe"] == "uint8" and list(notes["tried"]) == ["uint8"]


def test_percentile_calibration_quantizes_a_model_whose_probabilities_barely_vary(
        flat_output_onnx, xray_small, tmp_path):
    """The float32 head's tensors are left out of calibration: percentile's histogram of the
    output probabilities (a few float32 steps apart) cannot be built."""
    from export.int8.quantize import quantize_int8

    calibration = sorted(str(p) for p in (xray_small / "train").glob("*/*"))[::10]
    notes = quantize_int8(flat_output_onnx, tmp_path / "int8.onnx", calibration, 96,
                          recipes=(UINT8,))
    assert UINT8.calibration == "Percentile" and notes["recipe"] == "uint8"
    images = {"image": np.zeros((2, 96, 96, 3), np.float32)}
    # Against the float32 model, not a figure: its bias (so sigmoid(bias)) is the trained run's,
    # which differs from CPU to CPU.
    float32 = ort.InferenceSession(str(flat_output_onnx)).run(None, images)[0]
    int8 = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, images)[0]
    assert int8.shape == (2, 1) and np.all(np.abs(int8 - float32) < 0.01)


def test_a_recipe_that_cannot_be_built_gives_way_to_the_next(flat_output_onnx, xray_small,
                                                             tmp_path):
    import dataclasses

    from export.int8.quantize import quantize_int8

    # Percentile calibration of the output probabilities, which the uint8 recipe leaves out,
    # fails ("Too many bins for data range"); MinMax does not.
    calibrated_head = dataclasses.replace(UINT8, name="uint8_calibrated_head",
                                          float32_layers=lambda graph: [])
    calibration = sorted(str(p) for p in (xray_small / "train").glob("*/*"))[::10]
    notes = quantize_int8(flat_output_onnx, tmp_path / "int8.onnx", calibration, 96,
                          recipes=(calibrated_head, MIXED_16BIT))
    assert notes["recipe"] == "mixed_16bit"
    assert "Too many bins" in notes["tried"]["uint8_calibrated_head"]["error"]
    assert (tmp_path / "int8.onnx").is_file()


def test_the_calibration_reader_serves_one_stride_of_batches_at_a_time(tmp_path):
    """quantize_static calibrates one batch per step (CalibStridedMinMax), so a histogram holds
    one batch's activations and a shorter last batch is read alone."""
    from export.int8.quantize import ImageReader
    from tests.conftest import write_class_images

    paths = [str(p) for p in sorted(write_class_images(tmp_path, ["a"], 20).rglob("*.png"))]
    with ImageReader(paths, 24, batch_size=8) as reader:
        assert len(reader) == 3
        reader.set_range(start_index=2, end_index=3)
        assert reader.get_next()["image"].shape == (4, 24, 24, 3) and reader.get_next() is None
        reader.set_range(start_index=0, end_index=1)
        assert reader.get_next()["image"].shape == (8, 24, 24, 3) and reader.get_next() is None
        assert reader.progress.done == 12  # counted on across strides


def test_uint8_rounds_every_int8_layer_by_gptq_and_keeps_seven_bit_weights(mobilenet_uint8):
    """GPTQ re-rounds the weights on the quantizer's own grid: every layer in int8 (the 49
    convolutions between the stem and the head), none outside [-64, 64], so onnxruntime's 16-bit
    pair sums still cannot saturate on CPUs without VNNI."""
    from onnx import numpy_helper

    path, notes = mobilenet_uint8
    assert notes["gptq_rounded_layers"] == 49
    assert notes["gptq_images"] == notes["calibration_images"] > 0  # all of them, under 64
    model = onnx.load(str(path))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(weights) == 49
    assert min(w.min() for w in weights) >= -64 and max(w.max() for w in weights) <= 64


def _prepared(model: Path, tmp_path: Path):
    """The graph as the quantizer sees it (quant_pre_process: shapes inferred)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(model), str(tmp_path / "prepared.onnx"), skip_symbolic_shape=True)
    return onnx.load(str(tmp_path / "prepared.onnx"))


def test_uint8_keeps_mobilenet_v2s_first_block_in_float32(mobilenet_onnx, tmp_path):
    """Up to its first linear bottleneck: the first convolution, the depthwise and the projection."""
    graph = _prepared(mobilenet_onnx, tmp_path)
    convolutions = [node.name for node in graph.graph.node if node.op_type == "Conv"]
    kept = [name for name in UINT8.float32_layers(graph) if name in convolutions]
    assert kept == convolutions[:3]
    assert "expanded_conv_depthwise" in convolutions[1]


def test_uint8_keeps_the_classifier_head_and_its_probabilities_in_float32(mobilenet_uint8):
    """After the last convolution: the pooling, both dense layers and the sigmoid, so that the
    probabilities come out of the sigmoid itself, not rounded to a uint8 grid."""
    model = onnx.load(str(mobilenet_uint8[0]))
    producers = {output: node for node in model.graph.node for output in node.output}
    dense = [node for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    assert len(dense) == 2
    assert all(producers[name].op_type != "DequantizeLinear"
               for node in dense for name in node.input if name in producers)
    assert producers["probabilities"].op_type == "Sigmoid"


def test_uint8_keeps_only_vgg16s_first_convolution_in_float32(vgg16_exported_by_job, tmp_path):
    graph = _prepared(vgg16_exported_by_job / "model.onnx", tmp_path)
    convolutions = [node.name for node in graph.graph.node if node.op_type == "Conv"]
    kept = [name for name in UINT8.float32_layers(graph) if name in convolutions]
    assert len(convolutions) == 13 and kept == convolutions[:1]


def test_the_report_counts_the_operators_onnxruntime_runs_in_int8(mobilenet_export):
    _, report, _ = mobilenet_export
    operators = report["operators"]
    assert operators["model.onnx"]["int8_mac_share"] == 0
    assert operators["model.onnx"]["float32_operators"]["Conv"] == 52
    int8 = operators["model.int8.onnx"]
    if report["quantization"]["recipe"] == "uint8":  # the fast path: all in int8 but the stem
        assert int8["int8_operators"]["QLinearConv"] == 49 and int8["float32_operators"]["Conv"] == 3
        assert int8["int8_mac_share"] > 0.85  # the stem is 9 % of the MACs
    else:  # 16-bit tensors leave the convolutions in float32: the report says why it is slow
        assert int8["float32_operators"]["Conv"] == 52 and int8["int8_mac_share"] < 0.05
    assert operators["model.onnx"]["macs"] == int8["macs"] > 0


def test_the_report_times_openvino_beside_onnxruntime_on_the_same_files(mobilenet_export):
    pytest.importorskip("openvino", reason="OpenVINO is not installed: "
                                           "pip install -r requirements-openvino.txt")
    _, report, _ = mobilenet_export
    assert report["latency_settings"]["openvino"].startswith("20")  # its version: 2026.0.0-...
    parity = report["parity"]
    for backend in ("openvino_float32", "openvino_int8"):
        assert report["latency"][backend]["batch1_p50_ms"] > 0
        assert report["latency"][backend]["batch32_images_per_s"] > 0
        assert 0 <= parity["accuracy"][backend] <= 1
    # The same float32 file in another runtime: the same probabilities to rounding.
    assert parity["openvino_float32"]["max_abs_diff"] <= 1e-4
    assert parity["openvino_float32"]["top1_agreement"] >= 0.99
    # The same QDQ file: OpenVINO's int8 labels are about onnxruntime's, not gated.
    assert abs(parity["openvino_int8"]["top1_agreement"] - parity["int8"]["top1_agreement"]) <= 0.03


def test_a_side_runtime_that_is_not_installed_is_skipped_and_the_report_says_why(monkeypatch):
    from edge import runtime
    from export import pipeline

    monkeypatch.setitem(runtime.RUNTIMES, "absent",
                        runtime.Runtime("no_such_runtime_module", "requirements-absent.txt", None))
    monkeypatch.setattr(pipeline, "OPTIONAL_RUNTIMES", ("absent",))
    predictors, notes = pipeline.side_by_side(formats=(), context=None)
    assert predictors == {}
    assert notes == {"absent": "skipped: runtime absent: no_such_runtime_module is not installed; "
                               "install it with `pip install -r requirements-absent.txt`"}


def test_onnx_model_has_named_io_dynamic_batch_opset_and_metadata(mobilenet_onnx, mobilenet_run):
    model = onnx.load(str(mobilenet_onnx))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probabilities"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [96, 96, 3]
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["labels"]) == ["NORMAL", "PNEUMONIA"]
    threshold = json.loads((mobilenet_run / "metrics.json").read_text())["decision_threshold"]
    assert meta["image_size"] == "96" and float(meta["decision_threshold"]) == threshold
    assert "edge.images.load_image" in meta["preprocessing"] and "RGB 0-255" in meta["preprocessing"]
    assert "class index 1" in meta["output"]
    assert meta["source_run_id"] == "mobilenet" and meta["source_run_uri"] == str(mobilenet_run)
    assert json.loads(meta["parity"])["status"] == "passed"
    session = ort.InferenceSession(str(mobilenet_onnx))
    for batch in (1, 3):
        output = session.run(None, {"image": np.zeros((batch, 96, 96, 3), np.float32)})[0]
        assert output.shape == (batch, 1) and output.dtype == np.float32


def _bits(model):
    """For a QDQ model: a function giving the width of the integers behind a DequantizeLinear
    output."""
    initializers = {i.name: i.data_type for i in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}

    def bits(tensor: str) -> int:
        dequantize = producers[tensor]
        assert dequantize.op_type == "DequantizeLinear", tensor
        return {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
                onnx.TensorProto.INT16: 16}[initializers[dequantize.input[2]]]
    return bits


def test_mixed_16bit_recipe_keeps_8_bits_for_weights_and_16_for_what_runs_in_float32(
        mobilenet_onnx, xray_small, tmp_path):
    from export.int8.quantize import quantize_int8

    calibration = sorted(str(p) for p in (xray_small / "train").glob("*/*"))[::5]
    quantize_int8(mobilenet_onnx, tmp_path / "int8.onnx", calibration, 96,
                  recipes=(MIXED_16BIT,))
    model = onnx.load(str(tmp_path / "int8.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 21  # 16-bit QuantizeLinear
    bits = _bits(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    shapes = {i.name: i.dims for i in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    short = [n for n in convs  # at most 32 weights per output channel
             if np.prod(shapes[producers[n.input[1]].input[0]][1:]) <= 32]
    assert len(depthwise) == 17 and all(n in short for n in depthwise) and convs[0] in short
    assert len(short) > len(depthwise) + 1  # and narrow pointwise convolutions
    assert {bits(n.input[1]) for n in short} == {16}
    assert {bits(n.input[1]) for n in convs if n not in short} == {8}  # most of the bytes
    residual_sums = [n for n in model.graph.node if n.op_type == "Add"
                     and all(producers[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(residual_sums) == 10 and {bits(i) for n in residual_sums for i in n.input} == {16}
    # Every block touches a 16-bit tensor, so every convolution runs in float32 and reads 16 bits
    # (8 would only add rounding); the classifier's first dense layer still runs in int8.
    assert {bits(n.input[0]) for n in convs} == {16}
    head = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert [bits(n.input[0]) for n in head] == [8, 8]


def test_every_line_of_a_training_and_export_run_is_json(vgg16_exported_by_job):
    lines = (vgg16_exported_by_job.parent / "stderr.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    loggers = {entry["logger"] for entry in entries}
    assert {"job", "export"} <= loggers
    assert all(entry["run_id"] == "vgg16" for entry in entries if entry["logger"] == "job")


def test_vgg16_int8_runs_its_convolutions_in_int8(vgg16_exported_by_job):
    """By either recipe: each keeps only the first convolution (0.6 % of the MACs at 32 px) in
    float32."""
    report = json.loads((vgg16_exported_by_job / "export_report.json").read_text())
    int8 = report["operators"]["model.int8.onnx"]
    assert int8["int8_operators"]["QLinearConv"] >= 12 and int8["int8_mac_share"] > 0.99


@pytest.mark.parametrize("flipped, passes", [(0, True), (2, True), (3, False)])
def test_the_default_int8_gate_needs_99_percent_agreement_and_one_point_of_accuracy(flipped, passes):
    from export.config import ExportConfig
    from export.formats import judge

    outputs, labels = gate_outputs(flipped)
    parity, failures, _ = judge(outputs, labels, run_record(), ExportConfig(run_uri="run"))
    assert parity["int8"]["top1_agreement"] == 1 - flipped / 200
    assert failures == ([] if passes else [
        "int8: top-1 agreement 98.50% < 99.0%; test accuracy 98.50% vs float32 100.00%: "
        "1.50 points apart > 1"])


def test_the_int8_gate_is_the_one_the_settings_ask_for():
    from export.config import ExportConfig
    from export.formats import judge

    def settings(min_agreement: float, max_drop: float) -> ExportConfig:
        return ExportConfig(run_uri="run", int8_min_agreement=min_agreement,
                            int8_max_accuracy_drop=max_drop)

    outputs, labels = gate_outputs(flipped=10)
    assert judge(outputs, labels, run_record(), settings(0.94, 0.06))[1] == []
    assert judge(outputs, labels, run_record(), settings(0.96, 0.06))[1] == [
        "int8: top-1 agreement 95.00% < 96.0%"]


def test_mixed_precision_run_exports_a_float32_graph(mixed_precision_run):
    from export.convert import float16_tensors

    code, report, stderr = export_run(mixed_precision_run, INT8="0")
    assert code == 0, stderr[-2000:]
    assert report["training_precision_policy"] == "mixed_float16"
    assert report["parity"]["reference"] == "tensorflow_float32_rebuild"
    assert report["parity"]["saved_model_vs_onnx_float32"]["top1_agreement"] >= 0.99
    model = onnx.load(str(mixed_precision_run / "model.onnx"))
    assert float16_tensors(model) == []
    inferred = onnx.shape_inference.infer_shapes(model)
    element_types = {v.type.tensor_type.elem_type for v in
                     (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    initializer_types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 not in element_types | initializer_types
    assert onnx.TensorProto.FLOAT in initializer_types


def test_failed_gate_exits_1_writes_a_failed_report_and_withholds_the_models(
        vgg16_exported_by_job, tmp_path, monkeypatch):
    from export import __main__ as entrypoint
    from export import measure

    monkeypatch.setattr(measure, "FLOAT32_MAX_ABS_DIFF", -1.0)  # no model can pass this gate
    target = tmp_path / "export"
    code = entrypoint.main({"RUN_URI": str(vgg16_exported_by_job), "EXPORT_URI": str(target),
                            "CACHE_DIR": str(tmp_path / "cache"), "INT8": "0",
                            "LATENCY_RUNS": "1", "PARITY_IMAGES": "60"})  # the gate fails anyway
    assert code == 1
    report = json.loads((target / "export_report.json").read_text())
    assert report["status"] == "failed"
    assert report["failed_gates"][0].startswith("float32: max |diff|")
    assert not (target / "model.onnx").exists() and report["files"] == {}


def test_incomplete_run_exits_2_naming_it(vgg16_exported_by_job, tmp_path):
    run = tmp_path / "half-run"
    shutil.copytree(vgg16_exported_by_job, run, ignore=shutil.ignore_patterns("MANIFEST.json"))
    result = run_in_process("export", {"RUN_URI": str(run), "CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert f"RUN_URI={run}: no MANIFEST.json" in result.stderr


@pytest.mark.parametrize("env, variable", [
    ({"RUN_URI": "/nonexistent/run", "OPSET": "99"}, "OPSET"),
    ({"RUN_URI": "/nonexistent/run", "INT8": "maybe"}, "INT8"),
    ({}, "RUN_URI"),
])
def test_bad_setting_exits_2_naming_the_variable(env, variable, tmp_path, main_in_process):
    result = main_in_process("export", {"RUN_URI": "", "CACHE_DIR": str(tmp_path), **env})
    assert result.returncode == 2
    assert variable in result.stderr.strip().splitlines()[-1]
