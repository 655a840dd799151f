"""Formats: the table of ONNX files the export writes, how each is built, and the gates they pass.

Each row of FORMATS is one output file: its key (the format's one id, which names its parity
figures, gate verdict, build time and backend, "onnx_" + key), its file name, how it is built, the
precision its metadata states and its gate. export_formats(config) is the table for one export
(INT8=0 drops int8); the pipeline builds the rows in order and judge() gates them, so adding a
format is adding a row.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from common.record import RunRecord
from export import convert, measure
from export.config import ExportConfig
from export.errors import ExportError

if TYPE_CHECKING:
    from job.inputs.data import Split  # job.inputs.data imports TensorFlow

FLOAT32_MODEL, INT8_MODEL = "model.onnx", "model.int8.onnx"
SAVED_MODEL = "tensorflow"  # the run's SavedModel, as deployed for serving
REBUILD = "tensorflow_float32_rebuild"  # the float32 rebuild of its weights, run by TensorFlow


class BuildContext:
    """What the builders work from: the run, the staging folder, the calibration images and the
    parity images (the test images every model is judged on).

    The float32 rebuild is made on first use, by the float32 conversion, so its time counts as
    the conversion's; parity runs the same model (the reference of a mixed-precision run).
    """

    def __init__(self, config: ExportConfig, record: RunRecord, run_dir: Path, staging: Path,
                 calibration: Split, parity: Split):
        self.config, self.record, self.run_dir = config, record, run_dir
        self.staging, self.calibration, self.parity = staging, calibration, parity

    @functools.cached_property
    def rebuilt(self):
        classifier, _ = convert.rebuild_float32(self.run_dir, self.record)
        return classifier

    @functools.cached_property
    def parity_images(self) -> np.ndarray:
        from edge.images import load_images

        return load_images(self.parity.paths, self.record.image_size)


def build_float32(context: BuildContext) -> tuple[Any, None]:
    """tf2onnx's graph of the float32 rebuild, refused if any tensor in it is half precision."""
    proto = convert.to_onnx(context.rebuilt, context.record.image_size, context.config.opset)
    half = convert.float16_tensors(proto)
    if half:
        raise ExportError(f"the converted graph holds float16 tensors: {half[:5]}")
    return proto, None


def build_int8(context: BuildContext) -> tuple[Any, dict]:
    """The staged float32 model quantized to int8 on the calibration images by the fastest recipe
    that passes the int8 gate against it, and what quantization did (for the report)."""
    from export.int8.quantize import quantize_int8

    target = context.staging / INT8_MODEL
    notes = quantize_int8(context.staging / FLOAT32_MODEL, target, context.calibration.paths,
                          context.record.image_size, accept=int8_acceptance(context))
    return convert.load(target), notes


def int8_acceptance(context: BuildContext) -> Callable[[Path], tuple[bool, dict]]:
    """quantize_int8's accept: the int8 gate on the parity images, with the staged float32 model
    as the reference (judge() later applies it against TensorFlow, which float32 matches to
    1e-4). The same images and gate: a recipe is kept exactly when it would pass."""
    from edge.runtime import cpu_session

    config, threshold = context.config, context.record.decision_threshold
    labels = np.asarray(context.parity.labels)

    def probabilities(path: Path) -> np.ndarray:
        session = cpu_session(path, config.intra_op_threads)
        return measure.predict_all(measure.onnx_predictor(session), context.parity_images,
                                   f"choosing the int8 recipe, {path.name}")

    reference = probabilities(context.staging / FLOAT32_MODEL)
    reference_accuracy = measure.accuracy(reference, labels, threshold)

    def accept(candidate: Path) -> tuple[bool, dict]:
        outputs = probabilities(candidate)
        figures = measure.compare(outputs, reference, threshold)
        accuracy = measure.accuracy(outputs, labels, threshold)
        figures["accuracy_difference"] = accuracy - reference_accuracy
        return gate_int8(figures, accuracy, reference_accuracy, config) is None, figures
    return accept


def limits_float32(config: ExportConfig) -> dict:
    # Read from measure at call time, so the report states the thresholds float32_gate applied.
    return {"max_abs_diff": measure.FLOAT32_MAX_ABS_DIFF,
            "top1_agreement": measure.FLOAT32_MIN_AGREEMENT}


def limits_int8(config: ExportConfig) -> dict:
    return {"top1_agreement": config.int8_min_agreement,
            "max_accuracy_difference": config.int8_max_accuracy_drop}


def gate_float32(figures: dict, accuracy: float, baseline_accuracy: float | None,
                 config: ExportConfig) -> str | None:
    return measure.float32_gate(figures)


def gate_int8(figures: dict, accuracy: float, baseline_accuracy: float | None,
              config: ExportConfig) -> str | None:
    return measure.int8_gate(figures, accuracy, baseline_accuracy, config.int8_min_agreement,
                             config.int8_max_accuracy_drop)


Gate = Callable[[dict, float, float | None, ExportConfig], str | None]


@dataclasses.dataclass(frozen=True)
class Format:
    """One ONNX file of the export."""

    key: str  # the format's id: names its parity figures, gate, build time and backend
    file: str  # the ONNX file it writes (the report's "files", "opsets" and "fastest" name it so)
    build: Callable[[BuildContext], tuple[Any, dict | None]]  # (ModelProto, notes or None)
    precision: str  # metadata "precision", formatted with the build's notes
    gate: Gate  # (its figures, its accuracy, its baseline's, config) -> failure or None
    limits: Callable[[ExportConfig], dict]  # the gate's thresholds, as the report lists them
    # A format whose accuracy this one must keep, and which must pass for this one to pass.
    baseline: str | None = None
    # Under mixed precision the SavedModel computes in float16 and the reference is the float32
    # rebuild, so this format must also agree with the SavedModel itself.
    checks_saved_model: bool = False
    wanted: Callable[[ExportConfig], bool] = lambda config: True

    @property
    def backend(self) -> str:
        return "onnx_" + self.key


# In build order: int8 is quantized from the staged float32 file.
FORMATS = (
    Format("float32", FLOAT32_MODEL, build=build_float32,
           precision="float32", gate=gate_float32, limits=limits_float32,
           checks_saved_model=True),
    Format("int8", INT8_MODEL, build=build_int8,
           precision="int8 ({method}; {calibration_images} calibration images)",
           gate=gate_int8, limits=limits_int8, baseline="float32",
           wanted=lambda config: config.int8),
)


def export_formats(config: ExportConfig) -> tuple[Format, ...]:
    """The rows of FORMATS this export writes."""
    return tuple(row for row in FORMATS if row.wanted(config))


class Verdict(NamedTuple):
    parity: dict  # the report's "parity" figures
    failures: list[str]  # one line per failed gate, empty when every gate passed
    passed: dict[str, bool]  # by format key


def judge(outputs: dict[str, np.ndarray], labels: np.ndarray, record: RunRecord,
          config: ExportConfig) -> Verdict:
    """Compares every format's probabilities with the reference and applies its gate.

    outputs: probabilities by backend (SAVED_MODEL, REBUILD, "onnx_" + each format's key) on the
    same images. The reference is the SavedModel when the run trained in float32, the float32
    rebuild of the same weights under mixed precision (its SavedModel computes in float16).
    """
    threshold = record.decision_threshold
    reference = REBUILD if record.mixed_precision else SAVED_MODEL
    accuracies = {name: measure.accuracy(values, labels, threshold)
                  for name, values in outputs.items()}
    parity = {"reference": reference, "accuracy": accuracies,
              "rebuild_vs_saved_model": measure.compare(outputs[REBUILD], outputs[SAVED_MODEL],
                                                        threshold)}
    failures, passed, rows = [], {}, {row.key: row for row in FORMATS}
    for row in export_formats(config):
        figures = parity[row.key] = measure.compare(outputs[row.backend], outputs[reference],
                                                    threshold)
        baseline_accuracy = accuracies[rows[row.baseline].backend] if row.baseline else None
        if row.baseline:
            figures["accuracy_difference"] = accuracies[row.backend] - baseline_accuracy
        reasons = [row.gate(figures, accuracies[row.backend], baseline_accuracy, config)]
        if row.checks_saved_model and record.mixed_precision:
            parity[f"saved_model_vs_{row.backend}"] = measure.compare(
                outputs[row.backend], outputs[SAVED_MODEL], threshold)
            reasons.append(saved_model_gate(row, parity[f"saved_model_vs_{row.backend}"], record))
        reasons = [reason for reason in reasons if reason]
        failures += reasons
        passed[row.key] = not reasons and (not row.baseline or passed[row.baseline])
    return Verdict(parity, failures, passed)


def saved_model_gate(row: Format, figures: dict, record: RunRecord) -> str | None:
    """None when the format agrees with the run's mixed-precision SavedModel on >= 99% of labels."""
    agreement = figures["top1_agreement"]
    if agreement < measure.INT8_MIN_AGREEMENT:
        return (f"{row.key}: top-1 agreement with the {record.precision_policy} SavedModel "
                f"{agreement:.2%} < {measure.INT8_MIN_AGREEMENT:.0%}")
    return None
