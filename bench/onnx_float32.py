"""ONNX float32 against the SavedModel at batch 32: which conversion and session settings help.

Builds the job's classifier (VGG16 at 150 px by default, random weights: speed does not depend on
them), exports its SavedModel and converts it twice with tf2onnx, as the export does (NHWC input)
and with `inputs_as_nchw` (NCHW input, no leading Transpose). Then times, interleaved over
--repeats rounds in this one run, batch-32 images/s of: TensorFlow serving the SavedModel;
onnxruntime with every graph optimisation (the export's session) and with extended ones only, on
each layout; and OpenVINO as the edge predictor runs it (float32 arithmetic). Every variant's
output is compared with TensorFlow's. Prints JSON: medians, ratios to TensorFlow and the
arithmetic rate each reaches (GFLOP/s), to set against the CPU's peak.

    python -m bench.onnx_float32 [--backbone vgg16] [--image-size 150] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

from edge import runtime  # noqa: E402
from export import convert
from job.training import model

BATCH = 32


def convert_nchw(classifier, size: int):
    """convert.to_onnx, but with the input transposed to NCHW by tf2onnx (inputs_as_nchw)."""
    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name=convert.INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(image):
        return {convert.OUTPUT_NAME: classifier(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                             opset=17, inputs_as_nchw=[convert.INPUT_NAME])
    return proto


def ort_session(path: Path, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = runtime.available_cores()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def variants(classifier, size: int, work: Path) -> dict:
    """Name -> a function of the NHWC batch that returns the model's output."""
    classifier.export(str(work / "saved_model"), verbose=False)
    serve = tf.saved_model.load(str(work / "saved_model")).signatures["serving_default"]
    onnx.save(convert.to_onnx(classifier, size, 17), str(work / "nhwc.onnx"))
    onnx.save(convert_nchw(classifier, size), str(work / "nchw.onnx"))
    every, extended = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                       ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)

    def ort_run(path: Path, level, nchw: bool = False):
        session = ort_session(path, level)
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: np.ascontiguousarray(
            batch.transpose(0, 3, 1, 2)) if nchw else batch})[0]

    found = {"tensorflow": lambda batch: next(iter(serve(tf.constant(batch)).values())).numpy(),
             "onnxruntime_nhwc_all": ort_run(work / "nhwc.onnx", every),
             "onnxruntime_nhwc_extended": ort_run(work / "nhwc.onnx", extended),
             "onnxruntime_nchw_all": ort_run(work / "nchw.onnx", every, nchw=True)}
    try:
        found["openvino_f32"] = runtime.open_model(work / "nhwc.onnx", "openvino").run
    except runtime.RuntimeUnavailable as error:
        print(f"skipping OpenVINO: {error}", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16", choices=["vgg16", "mobilenet_v2"])
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    size = args.image_size
    keras.utils.set_random_seed(0)
    base, mode = model.build_base(args.backbone, 0.5, None, size)
    classifier = model.build_classifier(base, mode, 2, size, 0, 0.2).classifier
    flops = 2 * sum(int(np.prod(layer.kernel.shape)) * int(np.prod(layer.output.shape[1:3]))
                    for layer in base.layers if isinstance(layer, keras.layers.Conv2D))
    batch = np.random.default_rng(0).uniform(0, 255, (BATCH, size, size, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        runs = variants(classifier, size, Path(work))
        reference = runs["tensorflow"](batch)
        max_diff = {name: float(np.abs(run(batch) - reference).max()) for name, run in runs.items()}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():  # interleaved: a busy moment hits every variant alike
                started = time.perf_counter()
                run(batch)
                rates[name].append(BATCH / (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(json.dumps({
        "machine": {"platform": platform.platform(), "cores": runtime.available_cores(),
                    "load_average": os.getloadavg()},
        "backbone": args.backbone, "image_size": size, "batch": BATCH, "repeats": args.repeats,
        "conv_gflops_per_image": round(flops / 1e9, 2),
        "images_per_s": {name: round(value, 1) for name, value in medians.items()},
        "vs_tensorflow": {name: round(value / medians["tensorflow"], 2)
                          for name, value in medians.items()},
        "gflops_per_s": {name: round(value * flops / 1e9, 1) for name, value in medians.items()},
        "max_abs_diff_vs_tensorflow": max_diff}, indent=1))


if __name__ == "__main__":
    main()
