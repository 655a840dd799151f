"""Calibration: temperature scaling of the final classifier (Guo et al. 2017), fitted on validation.

After the final phase one temperature T is fitted on the validation split's probabilities by log
loss (scipy's bounded minimize_scalar on log T) and folded into the output Dense layer: its
kernel and bias are divided by T, as softmax((Wx+b)/T) = softmax((W/T)x + b/T) (and likewise for
the logit of a one-unit sigmoid head). So the SavedModel, the ONNX files the export converts from
it and the predictor all output calibrated probabilities, with no new layer or op.

The run's final scores are recomputed on the calibrated probabilities (those of the logits the
recorded probabilities imply, divided by T; with TTA each view's, then their mean, as the model's
outputs would be), and the two-class decision threshold is chosen again on them by the usual
rule (job.results.scoring). Calibration error is the top-label ECE: the images binned by the probability
of their most likely class into ECE_BINS equal-width bins over [0, 1], and the mean over bins,
weighted by images, of |accuracy - mean confidence| (argmax, not the decision threshold).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from scipy import optimize, special
from sklearn.metrics import log_loss

from job.cluster import distribute
from job.results import scoring

log = logging.getLogger("job")
ECE_BINS = 15
# T from 1/20 to 20: a T at either bound is refused (calibrate). At the lower one validation is
# separated: a real run's (MobileNetV2 0.35 probe, 50 X-rays, all right) went to 0.05, and its
# test log loss from 0.42 to 2.4.
LOG_TEMPERATURE_BOUNDS = (-np.log(20.0), np.log(20.0))
# float32 probabilities saturate: 1 - 6e-8 is the last below 1, a logit of about 16.6.
_SMALLEST = np.finfo(np.float32).eps / 2


@dataclasses.dataclass(frozen=True)
class Scored:
    """A phase's predictions as it was scored: labels and probabilities per split, and with TTA
    those of the horizontally flipped images (else None)."""

    labels: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]
    flipped: dict[str, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """The outcome: T, the scores of the calibrated probabilities (scoring.score_phase's result),
    the calibrated test probabilities as scored, and metrics.json's "calibration" block."""

    temperature: float
    scores: dict | None
    test_probabilities: np.ndarray | None
    record: dict


def logits(probabilities: np.ndarray) -> np.ndarray:
    """Logits that give these probabilities: of class 1 for one sigmoid unit, else the log of each
    softmax probability (softmax ignores a constant added to a row)."""
    p = np.clip(np.asarray(probabilities, np.float64), _SMALLEST, 1 - _SMALLEST)
    return np.log(p) - np.log1p(-p) if p.shape[-1] == 1 else np.log(p)


def scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities of the same logits divided by temperature."""
    z = logits(probabilities) / temperature
    return special.expit(z) if z.shape[-1] == 1 else special.softmax(z, axis=-1)


def scored_probabilities(probabilities: np.ndarray, flipped: np.ndarray | None,
                         temperature: float) -> np.ndarray:
    """What the run scores at temperature: each view scaled, then (TTA) their mean."""
    calibrated = scaled(probabilities, temperature)
    return calibrated if flipped is None else (calibrated + scaled(flipped, temperature)) / 2


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray,
                    flipped: np.ndarray | None = None) -> float:
    """The T that minimises the log loss of these labels, within LOG_TEMPERATURE_BOUNDS."""
    classes = 2 if np.shape(probabilities)[-1] == 1 else np.shape(probabilities)[-1]

    def loss(log_temperature: float) -> float:
        calibrated = scored_probabilities(probabilities, flipped, float(np.exp(log_temperature)))
        return log_loss(labels, per_class(calibrated), labels=range(classes))

    fitted = optimize.minimize_scalar(loss, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded",
                                      options={"xatol": 1e-4})
    return float(np.exp(fitted.x))


def per_class(probabilities: np.ndarray) -> np.ndarray:
    """(images, classes) probabilities, a one-unit sigmoid output widened to two columns."""
    p = np.asarray(probabilities, np.float64)
    return np.concatenate([1 - p, p], axis=-1) if p.shape[-1] == 1 else p


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin (top-label): images, mean confidence, accuracy; and ECE."""
    p = per_class(probabilities)
    confidence, correct = p.max(axis=-1), p.argmax(axis=-1) == np.asarray(labels)
    index = np.minimum((confidence * bins).astype(int), bins - 1)  # 1.0 in the last bin
    counts = np.bincount(index, minlength=bins)
    mean_confidence = np.bincount(index, confidence, bins) / np.maximum(counts, 1)
    accuracy = np.bincount(index, correct.astype(float), bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(accuracy - mean_confidence)) / max(1, len(confidence)))
    return {"ece": ece, "images": counts.tolist(), "confidence": mean_confidence.round(4).tolist(),
            "accuracy": accuracy.round(4).tolist()}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Top-label ECE over ECE_BINS equal-width bins (see the module docstring)."""
    return reliability(labels, probabilities)["ece"]


def fold(output_layer, temperature: float) -> None:
    """Divides the output Dense layer's kernel and bias by temperature."""
    kernel, bias = output_layer.get_weights()
    output_layer.set_weights([kernel / temperature, bias / temperature])


def skip_reason(scored: Scored, class_names: list[str]) -> str | None:
    """Why T stays 1, or None: too few validation images to fit T on. In all, not per class:
    one T is fitted on the whole split (clothing10's 341 include 12 skirts, and fit well)."""
    images = len(scored.labels.get("validation", []))
    needed = scoring.MIN_THRESHOLD_IMAGES * len(class_names)
    if images < needed:
        return (f"validation has {images} image(s), under the {scoring.MIN_THRESHOLD_IMAGES} per "
                f"class ({needed} for {len(class_names)} classes) needed to fit a temperature")
    return None


def calibrate(scored: Scored, class_names: list[str], output_layer, chief: bool,
              strategy) -> Calibrated:
    """Fits T on validation (the chief's T on every worker), folds it into output_layer and
    rescores; T = 1 with a warning where skip_reason says so."""
    started = time.perf_counter()
    reason = skip_reason(scored, class_names)
    if reason:
        log.warning("calibration skipped (temperature 1): %s", reason)
        return Calibrated(1.0, None, None, {"temperature": 1.0, "skipped": reason})
    temperature = fit_temperature(scored.labels["validation"], scored.probabilities["validation"],
                                  (scored.flipped or {}).get("validation"))
    temperature = float(distribute.from_chief([np.float64(temperature)], chief, strategy)[0])
    if abs(np.log(temperature)) > LOG_TEMPERATURE_BOUNDS[1] - 0.01:
        reason = (f"the temperature that fits validation best is at its bound, {temperature:.3g}: "
                  "with (nearly) every validation image right and far from the others, log "
                  "loss keeps falling as T shrinks, and such a T ruins the test split's")
        log.warning("calibration skipped (temperature 1): %s", reason)
        return Calibrated(1.0, None, None, {"temperature": 1.0, "skipped": reason})
    fold(output_layer, temperature)
    before = {name: scored_probabilities(p, (scored.flipped or {}).get(name), 1.0)
              for name, p in scored.probabilities.items()}
    after = {name: scored_probabilities(p, (scored.flipped or {}).get(name), temperature)
             for name, p in scored.probabilities.items()}
    scores = scoring.score_phase(
        scored.labels, {name: scaled(p, temperature) for name, p in scored.probabilities.items()},
        class_names, None if scored.flipped is None else
        {name: scaled(p, temperature) for name, p in scored.flipped.items()})
    record: dict = {"temperature": round(temperature, 4), "ece_bins": ECE_BINS,
                    "ece_definition": "top-label, equal-width bins"}
    for name in before:
        for when, probabilities in (("before", before), ("after", after)):
            bins = reliability(scored.labels[name], probabilities[name])
            record[f"{name}_ece_{when}"] = round(bins.pop("ece"), 4)
            record.setdefault("reliability", {}).setdefault(name, {})[when] = bins
    record["seconds"] = round(time.perf_counter() - started, 2)
    log.info("calibration: temperature %.3f fitted on validation; ECE %s; in %.1f s", temperature,
             ", ".join(f"{name} {record[f'{name}_ece_before']:.4f} -> "
                       f"{record[f'{name}_ece_after']:.4f}" for name in before), record["seconds"])
    return Calibrated(temperature, scores, after.get("test"), record)


def apply(metrics: dict, calibrated: Calibrated, record_key: str) -> None:
    """metrics.json's final scores and decision threshold (in the run record too) become those
    of the calibrated model; its "calibration" block is added."""
    metrics["calibration"] = calibrated.record
    if calibrated.scores is None:
        return
    for name in scoring.SCORED_SPLITS:
        metrics[name] = calibrated.scores[name]
    metrics["decision_threshold"] = calibrated.scores["decision_threshold"]
    metrics[record_key]["decision_threshold"] = calibrated.scores["decision_threshold"]
