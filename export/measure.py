"""Measure: the predictions, parity figures, gates and CPU latency of TensorFlow and onnxruntime.

Every backend is a function from a float32 image batch to probabilities, so parity and latency are
measured the same way for the SavedModel, the ONNX float32 and the ONNX int8 models.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common.progress import Progress
from edge.runtime import compare, predict_labels  # noqa: F401 (compare: used as measure.compare)
from export.convert import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger("export")

Predict = Callable[[np.ndarray], np.ndarray]

FLOAT32_MAX_ABS_DIFF = 1e-4
FLOAT32_MIN_AGREEMENT = 1.0
INT8_MIN_AGREEMENT = 0.99  # defaults of INT8_MIN_AGREEMENT and INT8_MAX_ACCURACY_DROP
INT8_MAX_ACCURACY_DROP = 0.01  # one percentage point, either way


def onnx_predictor(session) -> Predict:
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def saved_model_predictor(saved_model_dir: Path) -> Predict:
    """The run's SavedModel through its float32 pixels signature (job/training/serving.py), the one the
    ONNX models are converted from; `serving_default` takes encoded image bytes."""
    import tensorflow as tf

    from job.training.serving import PIXELS_SIGNATURE

    loaded = tf.saved_model.load(str(saved_model_dir))
    signature = loaded.signatures[PIXELS_SIGNATURE]
    input_name = next(iter(signature.structured_input_signature[1]))
    output_name = next(iter(signature.structured_outputs))

    def predict(batch: np.ndarray) -> np.ndarray:
        return signature(**{input_name: tf.constant(batch)})[output_name].numpy()

    predict.keep_alive = loaded  # the signature needs the loaded object to stay alive
    return predict


def keras_predictor(model) -> Predict:
    import tensorflow as tf

    function = tf.function(lambda batch: model(batch, training=False))
    return lambda batch: function(tf.constant(batch)).numpy()


def predict_all(predict: Predict, images: np.ndarray, step: str,
                batch_size: int = 32) -> np.ndarray:
    """The probabilities of every image, in batches, the progress logged as step."""
    outputs = []
    with Progress(step, len(images), "images", log) as progress:
        for start in range(0, len(images), batch_size):
            outputs.append(predict(images[start:start + batch_size]))
            progress.advance(len(outputs[-1]))
    return np.concatenate(outputs).astype(np.float32)


def accuracy(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(np.mean(predict_labels(probabilities, threshold) == np.asarray(labels)))


def float32_gate(figures: dict) -> str | None:
    """None when the float32 ONNX model matches its reference; else what failed and by how much."""
    problems = []
    if not figures["max_abs_diff"] <= FLOAT32_MAX_ABS_DIFF:
        problems.append(f"max |diff| {figures['max_abs_diff']:.3g} > {FLOAT32_MAX_ABS_DIFF:g}")
    if figures["top1_agreement"] < FLOAT32_MIN_AGREEMENT:
        problems.append(f"top-1 agreement {figures['top1_agreement']:.2%} < 100%")
    return "float32: " + "; ".join(problems) if problems else None


def int8_gate(figures: dict, int8_accuracy: float, float32_accuracy: float,
              min_agreement: float, max_accuracy_drop: float) -> str | None:
    """None when the int8 model agrees with the reference and keeps the float32 accuracy."""
    problems = []
    if figures["top1_agreement"] < min_agreement:
        problems.append(f"top-1 agreement {figures['top1_agreement']:.2%} < {min_agreement:.1%}")
    drop = abs(int8_accuracy - float32_accuracy)
    if drop > max_accuracy_drop + 1e-12:
        problems.append(f"test accuracy {int8_accuracy:.2%} vs float32 {float32_accuracy:.2%}: "
                        f"{drop * 100:.2f} points apart > {max_accuracy_drop * 100:g}")
    return "int8: " + "; ".join(problems) if problems else None


def latency(predict: Predict, images: np.ndarray, runs: int, batch_size: int = 32) -> dict:
    """p50/p95 milliseconds of single-image calls and images/s of batch_size calls on the CPU."""
    singles = [images[i % len(images)][None] for i in range(runs)]
    batch = np.stack([images[i % len(images)] for i in range(batch_size)])
    for warmup in singles[:3]:
        predict(warmup)
    predict(batch)
    timings = []
    for single in singles:
        started = time.perf_counter()
        predict(single)
        timings.append((time.perf_counter() - started) * 1000)
    batch_runs = max(3, runs // 10)
    started = time.perf_counter()
    for _ in range(batch_runs):
        predict(batch)
    seconds = time.perf_counter() - started
    return {
        "batch1_p50_ms": round(float(np.percentile(timings, 50)), 3),
        "batch1_p95_ms": round(float(np.percentile(timings, 95)), 3),
        "batch1_runs": runs,
        f"batch{batch_size}_images_per_s": round(batch_runs * batch_size / seconds, 1),
        f"batch{batch_size}_runs": batch_runs,
    }
