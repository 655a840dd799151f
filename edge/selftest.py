"""Self-test: `python -m edge.predict --self-test PATH` proves, on this machine's CPU, that each
exported ONNX file still computes what the export measured.

The export stages `selftest/` beside its ONNX files (export/selftest.py): SELFTEST_ARRAYS holds a
few dozen of the run's test images, decoded and resized as the models take them (uint8, exactly
the float32 values fed to the model), their true labels and the float32 reference model's
outputs on them; SELFTEST_SPEC the decision threshold and, per file, the limits of the gate the
export applied to it (and the figures it measured on these images on its own CPU). Each file is
run on these images and judged by its own limits: label agreement with the reference at the
decision threshold, accuracy difference from the reference, and the largest probability
difference (float32: its gate's 1e-4; int8: the export CPU's figure plus a margin). The images
were chosen clear of the decision boundary, so the small differences between CPUs' int8 kernels
(AVX2, AVX-512 VNNI, AMX) cannot flip a label; a flip means the file or its arithmetic on this
CPU is wrong.

Exit codes: 0 every file passed; 1 a file failed (one line names it); 2 no usable self-test set,
no ONNX file to test, or a runtime that is not installed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from edge.runtime import (RuntimeUnavailable, compare, cpu_description, open_model, predict_labels,
                          require_runtime)

SELFTEST_DIR = "selftest"
SELFTEST_SPEC = "selftest.json"
SELFTEST_ARRAYS = "selftest.npz"  # images (uint8 n,S,S,3), labels (n,), reference (n, outputs)
BATCH_SIZE = 32

log = logging.getLogger("edge")


class SelfTestError(Exception):
    """No usable self-test set at the path given; the message names what is wrong (exit 2)."""


@dataclass
class SelfTestSet:
    spec: dict  # SELFTEST_SPEC: decision_threshold, per file its format, limits, export figures
    images: np.ndarray  # float32 (n, S, S, 3), RGB 0-255: the models' input
    labels: np.ndarray
    reference: np.ndarray  # the float32 reference model's outputs on the images


@dataclass
class Result:
    file: str
    passed: bool
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def find(path: Path) -> tuple[Path, list[Path]]:
    """The folder holding selftest/ and the ONNX files to test: every *.onnx in a folder (a version
    or export folder), or the one file given."""
    if path.is_file():
        if path.suffix != ".onnx":
            raise SelfTestError(f"{path}: not an ONNX file (expected a folder or a .onnx file)")
        return path.parent, [path]
    if path.is_dir():
        return path, sorted(path.glob("*.onnx"))
    raise SelfTestError(f"{path}: no such file or folder")


def load(folder: Path) -> SelfTestSet:
    """The self-test set in folder/selftest/, its arrays checked against its spec."""
    spec_path, arrays_path = (folder / SELFTEST_DIR / name for name in (SELFTEST_SPEC,
                                                                         SELFTEST_ARRAYS))
    if not spec_path.is_file() or not arrays_path.is_file():
        raise SelfTestError(f"{folder}: no self-test set ({SELFTEST_DIR}/{SELFTEST_SPEC} and "
                            f"{SELFTEST_ARRAYS}, written by the export beside its ONNX files)")
    try:
        spec = json.loads(spec_path.read_text())
        with np.load(arrays_path, allow_pickle=False) as arrays:
            images, labels, reference = arrays["images"], arrays["labels"], arrays["reference"]
        threshold, files = float(spec["decision_threshold"]), spec["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SelfTestError(f"{folder / SELFTEST_DIR}: unreadable self-test set ({error})") \
            from None
    count = len(images)
    entries_ok = isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("limits"), dict) for entry in files.values())
    if not (count and len(labels) == count == len(reference)) or images.ndim != 4 \
            or images.dtype != np.uint8 or not entries_ok or not 0 <= threshold <= 1:
        raise SelfTestError(f"{folder / SELFTEST_DIR}: inconsistent self-test set ({count} images, "
                            f"{len(labels)} labels, {len(reference)} reference outputs, "
                            f"files {list(files) if isinstance(files, dict) else files!r:.100})")
    return SelfTestSet(spec, images.astype(np.float32), labels, reference)


def check_file(test_set: SelfTestSet, path: Path, runtime: str, threads: int | None) -> Result:
    """Runs one ONNX file on the set and applies its gate's limits."""
    entry = test_set.spec["files"].get(path.name)
    if entry is None:
        return Result(path.name, False, problems=["the self-test set has no entry for this file"])
    try:
        model = open_model(path, runtime, threads)
        outputs = np.concatenate([model.run(test_set.images[start:start + BATCH_SIZE])
                                  for start in range(0, len(test_set.images), BATCH_SIZE)])
    except Exception as error:  # onnxruntime and OpenVINO raise their own exception types
        return Result(path.name, False, problems=[
            f"cannot be run: {(str(error).splitlines() or [type(error).__name__])[0][:200]}"])
    if outputs.shape != test_set.reference.shape:
        return Result(path.name, False, problems=[
            f"outputs of shape {outputs.shape}, the reference's are {test_set.reference.shape}"])
    threshold = float(test_set.spec["decision_threshold"])
    figures = compare(outputs, test_set.reference, threshold)
    figures["accuracy_difference"] = (accuracy(outputs, test_set.labels, threshold)
                                      - accuracy(test_set.reference, test_set.labels, threshold))
    problems = gate(figures, entry["limits"])
    return Result(path.name, not problems, figures, problems)


def accuracy(outputs: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(np.mean(predict_labels(outputs, threshold) == labels))


def gate(figures: dict, limits: dict) -> list[str]:
    """What breaks the export's limits, as the export's gates judge them (export.measure)."""
    problems = []
    for name, limit in limits.items():
        if name == "top1_agreement" and figures["top1_agreement"] < limit:
            problems.append(f"agreement {figures['top1_agreement']:.2%} < {limit:.1%}")
        elif name == "max_abs_diff" and not figures["max_abs_diff"] <= limit:
            problems.append(f"max |diff| {figures['max_abs_diff']:.3g} > {limit:.3g}")
        elif name == "max_accuracy_difference" and \
                abs(figures["accuracy_difference"]) > limit + 1e-12:
            problems.append(f"accuracy {figures['accuracy_difference'] * 100:+.2f} points from "
                            f"the reference's > {limit * 100:g}")
        elif name not in ("top1_agreement", "max_abs_diff", "max_accuracy_difference"):
            raise SelfTestError(f"self-test limit {name!r}: unknown to this predictor (update it)")
    return problems


def line(result: Result, entry: dict | None) -> str:
    """One line per file: verdict, agreement, accuracy difference, max |diff| (and the export
    CPU's, for comparison), and what failed."""
    verdict = "PASS" if result.passed else "FAIL"
    if not result.figures:
        return f"{result.file}\t{verdict}\t{'; '.join(result.problems)}"
    figures, limits = result.figures, entry["limits"]
    at_export = entry.get("at_export", {})
    agreement = f"agreement {figures['top1_agreement']:.2%}"
    if "top1_agreement" in limits:
        agreement += f" (limit {limits['top1_agreement']:.1%})"
    accuracy_text = f"accuracy {figures['accuracy_difference'] * 100:+.2f} points"
    if "max_accuracy_difference" in limits:
        accuracy_text += f" (limit {limits['max_accuracy_difference'] * 100:g})"
    notes = [f"limit {limits['max_abs_diff']:.3g}"] if "max_abs_diff" in limits else []
    if "max_abs_diff" in at_export:
        notes.append(f"export's CPU {at_export['max_abs_diff']:.3g}")
    difference = f"max |diff| {figures['max_abs_diff']:.3g}" + (f" ({'; '.join(notes)})"
                                                                 if notes else "")
    text = "\t".join([result.file, verdict, agreement, accuracy_text, difference])
    return text + (f"\t{'; '.join(result.problems)}" if result.problems else "")


def self_test(path: Path, runtime: str, threads: int | None) -> int:
    """Tests every ONNX file at path against its self-test set; prints one line per file."""
    try:
        require_runtime(runtime)
        folder, files = find(path)
        test_set = load(folder)
        if not files:
            raise SelfTestError(f"{folder}: no .onnx file to test")
        results = [check_file(test_set, file, runtime, threads) for file in files]
    except (SelfTestError, RuntimeUnavailable) as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    for result in results:
        print(line(result, test_set.spec["files"].get(result.file)), flush=True)
    failed = [result.file for result in results if not result.passed]
    log.info("self-test of %d file(s) on %d image(s), %s, %s: %s", len(results),
             len(test_set.images), runtime, cpu_description(),
             f"FAILED: {', '.join(failed)}" if failed else "passed")
    return EXIT_FAILED if failed else EXIT_OK
