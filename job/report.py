"""Report: evaluation metrics, training-curve plots, the model summary and the run manifest.

Everything here turns numbers into files in a local run directory; MANIFEST.json, written last
by `write_manifest`, is what marks a run as complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from edge.runtime import predict_labels

MANIFEST = "MANIFEST.json"


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           class_names: list[str], threshold: float = 0.5) -> dict:
    """Accuracy, log loss, per-class precision/recall/F1, confusion matrix, ROC AUC (two classes)."""
    labels = np.asarray(labels).astype(int)
    predicted = predict_labels(probabilities, threshold)
    class_probabilities = _class_probabilities(probabilities)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=range(len(class_names)), zero_division=0)
    result = {
        "images": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else None,
        "loss": float(skm.log_loss(labels, class_probabilities, labels=range(len(class_names))))
        if len(labels) else None,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": skm.confusion_matrix(
            labels, predicted, labels=range(len(class_names))).tolist(),
    }
    if len(class_names) == 2:
        result["threshold"] = threshold
        result["roc_auc"] = (float(skm.roc_auc_score(labels, class_probabilities[:, 1]))
                             if len(set(labels.tolist())) == 2 else None)
    return result


def balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold on class-1 scores with the best balanced accuracy (Youden's J) on these labels."""
    labels = np.asarray(labels).astype(int)
    if len(set(labels.tolist())) < 2:
        return 0.5
    false_positive_rate, true_positive_rate, thresholds = skm.roc_curve(labels, scores)
    best = int(np.argmax(true_positive_rate - false_positive_rate))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def _class_probabilities(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[-1] == 1:
        return np.concatenate([1 - probabilities, probabilities], axis=-1)
    return probabilities / probabilities.sum(axis=-1, keepdims=True)  # float32 softmax rounding


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider draws it."""
    smoothed, last = [], None
    for value in values:
        last = value if last is None else weight * last + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def plot_history(history: dict[str, list[float]], title: str, path: Path) -> None:
    """Accuracy and loss per epoch, training and validation, raw (thin) and smoothed (bold)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("accuracy", "loss")):
        for key, label, colour in ((metric, "training", "tab:blue"),
                                   (f"val_{metric}", "validation", "tab:orange")):
            values = history.get(key, [])
            epochs = range(1, len(values) + 1)
            axis.plot(epochs, values, color=colour, alpha=0.35, linewidth=1, label=f"{label} (raw)")
            axis.plot(epochs, smooth(values), color=colour, linewidth=2, label=f"{label} (smoothed)")
        axis.set_title(f"{title}: {metric}")
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def write_json(path: Path, data: dict) -> None:
    """Writes JSON through a temporary file and a rename, so a reader never sees half a file."""
    temporary = Path(f"{path}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(temporary, path)


def write_manifest(run_dir: Path) -> dict:
    """Lists every file of the run with its size and SHA-256; written last, it marks completion."""
    files = {}
    for path in sorted(p for p in Path(run_dir).rglob("*") if p.is_file() and p.name != MANIFEST):
        relative = str(path.relative_to(run_dir))
        if relative.startswith("checkpoints/"):
            continue
        files[relative] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"files": files}
    write_json(Path(run_dir, MANIFEST), manifest)
    return manifest


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
