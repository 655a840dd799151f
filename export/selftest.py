"""Self-test set: what a device needs to prove that the exported files run right on its CPU.

stage_selftest writes `selftest/` into the export's staging folder, beside the ONNX files (so
`publish` copies it with them and promotion copies it into the production version): a few dozen
of the parity images, the float32 reference's outputs on them and each passed file's gate limits.
`python -m edge.predict --self-test` (edge/selftest.py) reads it on the device.

The images are stored decoded (uint8 RGB at the model's size: exactly the float32 values the
models take, a quarter of the bytes), not as image files: the reference outputs are then a
function of the ONNX file and the CPU alone. A JPEG decoder of another version moves pixels by
a level or two, which alone would put a perfect float32 file past its 1e-4 limit on the device.

They are chosen clear of the decision boundary: on every image, the reference's and each file's
outputs on the export's CPU give the same label with at least MARGIN_LOGIT of room in logit. Int8
kernels differ by CPU (8-bit weights: 6.2 % of one file's labels changed between an AVX2 and an
AMX machine, export/int8/quantize.py), so an image near the boundary can flip on a correct device;
one that is clear flips only when the file or its arithmetic is wrong. The export's limits then
apply unchanged; an int8 file, whose gate sets no largest difference, is also held to the export
CPU's plus MAX_DIFF_MARGIN, so a change that moves outputs without flipping a clear label fails.
"""
from __future__ import annotations

import logging

import numpy as np

from edge.runtime import cpu_description, predict_labels
from edge.selftest import SELFTEST_ARRAYS, SELFTEST_DIR, SELFTEST_SPEC
from export import measure
from export.config import ExportConfig
from export.formats import BuildContext, Format, Verdict
from common.run_files import write_json

log = logging.getLogger("export")

SELFTEST_IMAGES = 32
# Room, in logit (the pre-sigmoid or pre-softmax value, where quantization error adds), between
# an image's outputs and the decision boundary. Measured on the MobileNetV2 test run's int8 file:
# the same file run by AVX2's fused int8 kernels and as its QDQ graph unfused (each layer in
# float32 between quantize steps: a proxy for another CPU's kernels, more pessimistic than the
# VNNI and AMX machines, which gave the same 7-bit file's outputs to the last bit) moved the
# logit by at most 0.36 on 300 test images (the uint8 recipe; mixed_16bit 0.12): 1.0 is about
# three times that. 234 of the 300 images were that clear.
MARGIN_LOGIT = 1.0
# How much further from the reference than on the export's CPU a file's outputs may be on the
# device (in probability) where its gate sets no limit of its own (int8). By the same proxy the
# file moved by at most 0.062 on the 32 images chosen (0.079 on all 300; the mixed_16bit recipe's
# file 0.010 and 0.023).
MAX_DIFF_MARGIN = 0.1
PROBABILITY_FLOOR = 1e-7  # float32 sigmoid outputs reach 0 and 1: their logit is taken there


def stage_selftest(context: BuildContext, formats: tuple[Format, ...], verdict: Verdict,
                   outputs: dict[str, np.ndarray]) -> dict | None:
    """Writes selftest/ into context.staging for the files that passed their gates; returns what
    it wrote for export_report.json (None when no file passed: nothing to test)."""
    passed = [row for row in formats if verdict.passed[row.key]]
    if not passed:
        return None
    threshold = context.record.decision_threshold
    reference = outputs[verdict.parity["reference"]]
    labels = np.asarray(context.parity.labels)
    chosen, room = choose_images(reference, [outputs[row.backend] for row in passed], threshold,
                                 SELFTEST_IMAGES, seed=context.record.seed + 2)
    if room.min() < MARGIN_LOGIT:
        log.warning("self-test: only %d of %d images are %.1f logit clear of the decision "
                    "boundary; the nearest is %.2f, and may flip on another CPU",
                    int((room >= MARGIN_LOGIT).sum()), len(chosen), MARGIN_LOGIT, room.min())
    folder = context.staging / SELFTEST_DIR
    folder.mkdir()
    np.savez_compressed(folder / SELFTEST_ARRAYS,
                        images=context.parity_images[chosen].astype(np.uint8),
                        labels=labels[chosen], reference=reference[chosen])
    write_json(folder / SELFTEST_SPEC, {
        "run_id": context.record.run_id, "classes": context.record.classes,
        "image_size": context.record.image_size, "decision_threshold": threshold,
        "reference": verdict.parity["reference"], "images": len(chosen),
        "margin_logit": MARGIN_LOGIT, "least_room_logit": round(float(room.min()), 3),
        "export_cpu": cpu_description(),
        "max_abs_diff_margin": MAX_DIFF_MARGIN,
        "files": {row.file: file_entry(row, context.config, outputs[row.backend][chosen],
                                       reference[chosen], threshold) for row in passed}})
    files = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
    log.info("self-test set: %d images, %s bytes, for %s", len(chosen),
             " + ".join(f"{size:,}" for size in files.values()), ", ".join(r.file for r in passed))
    return {"folder": SELFTEST_DIR, "images": len(chosen), "bytes": files}


def file_entry(row: Format, config: ExportConfig, outputs: np.ndarray, reference: np.ndarray,
               threshold: float) -> dict:
    """One file's entry: its format, the figures it had on the export's CPU, and the limits the
    device holds it to: its gate's, and where the gate sets no largest difference (int8), the
    export CPU's largest difference plus MAX_DIFF_MARGIN. That catches a file changed in a way
    that moves outputs but no label of these clear images (a layer's weights scaled)."""
    at_export = measure.compare(outputs, reference, threshold)
    limits = row.limits(config)
    limits.setdefault("max_abs_diff", round(at_export["max_abs_diff"] + MAX_DIFF_MARGIN, 6))
    return {"format": row.key, "gate": row.limits(config), "limits": limits,
            "at_export": at_export}


def choose_images(reference: np.ndarray, candidates: list[np.ndarray], threshold: float,
                  count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of up to count images, drawn at random (seeded) in turn from each class the
    reference predicts, among those with MARGIN_LOGIT of room for every output; the images with
    the most room fill any places left. Returns the sorted indices and each one's room."""
    labels = predict_labels(reference, threshold)
    room = np.min([room_logit(output, labels, threshold) for output in (reference, *candidates)],
                  axis=0)
    order = np.random.default_rng(seed).permutation(len(labels))
    clear = [[i for i in order if labels[i] == label and room[i] >= MARGIN_LOGIT]
             for label in np.unique(labels)]
    chosen = []
    while len(chosen) < count and any(clear):  # round robin over the classes
        for queue in clear:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    taken = set(chosen)
    rest = [i for i in np.argsort(-room, kind="stable") if i not in taken]
    chosen = np.sort(np.array(chosen + rest[:count - len(chosen)], dtype=int))
    return chosen, room[chosen]


def room_logit(outputs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """How far, in logit, each output is on the side of its label: one sigmoid unit against the
    threshold's logit, a softmax row as the label's log-probability over the next largest
    (negative where the output gives another label)."""
    values = np.clip(outputs.astype(np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    if values.shape[-1] == 1:
        logit = np.log(values[:, 0] / (1 - values[:, 0]))
        boundary = np.log(max(threshold, PROBABILITY_FLOOR) / max(1 - threshold, PROBABILITY_FLOOR))
        return np.where(labels == 1, logit - boundary, boundary - logit)
    logs = np.log(values)
    own = logs[np.arange(len(labels)), labels]
    others = np.where(np.eye(values.shape[-1], dtype=bool)[labels], -np.inf, logs)
    return own - others.max(axis=-1)
