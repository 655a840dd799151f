"""Plots: the run's figures as PNG, drawn by matplotlib on its file-only backend.

The training curves of a phase (written beside metrics.json and embedded in report.html) and the
figures of report.html (job/results/run_page.py): reliability diagrams, confusion matrices, ROC
and precision-recall curves. matplotlib is imported on first use, as only the end of a run draws.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from sklearn import metrics as skm


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider draws it."""
    smoothed, last = [], None
    for value in values:
        last = value if last is None else weight * last + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def plot_history(history: dict[str, list[float]], title: str, path: Path) -> None:
    """Accuracy and loss per epoch, training and validation, raw (thin) and smoothed (bold), as
    PNG to path (a file path or a binary stream: report.html embeds them)."""
    figure, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("accuracy", "loss")):
        for key, label, colour in ((metric, "training", "tab:blue"),
                                   (f"val_{metric}", "validation", "tab:orange")):
            values = history.get(key, [])
            epochs = range(1, len(values) + 1)
            axis.plot(epochs, values, color=colour, alpha=0.35, linewidth=1, label=f"{label} (raw)")
            axis.plot(epochs, smooth(values), color=colour, linewidth=2, label=f"{label} (smoothed)",
                      marker="o" if len(values) == 1 else None)  # one epoch: a point, not a line
        axis.set_title(f"{title}: {metric}")
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot().close(figure)


def reliability_png(diagram: dict) -> bytes:
    """Accuracy against confidence per bin, before and after calibration, side by side."""
    figure, axes = pyplot().subplots(1, 2, figsize=(10, 4.2))
    for axis, when in zip(axes, ("before", "after")):
        bins = diagram[when]
        edges = np.linspace(0, 1, len(bins["images"]) + 1)
        filled = np.asarray(bins["images"]) > 0
        axis.bar(edges[:-1][filled], np.asarray(bins["accuracy"])[filled],
                 width=edges[1] - edges[0], align="edge", edgecolor="black", alpha=0.7,
                 label="accuracy")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        axis.scatter(np.asarray(bins["confidence"])[filled], np.asarray(bins["accuracy"])[filled],
                     color="tab:red", s=12, zorder=3, label="mean confidence")
        axis.set(xlabel="confidence (top label)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
                 title=f"test, {when} calibration")
        axis.legend(fontsize=8, loc="upper left")
    return png(figure)


def confusion_png(matrix: np.ndarray, class_names: list[str], caption: str) -> bytes:
    side = min(12, 3.5 + 0.55 * len(class_names))
    figure, axis = pyplot().subplots(figsize=(side, side * 0.85))
    skm.ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=axis, cmap="Blues", colorbar=False, xticks_rotation=45 if len(class_names) > 4 else 0)
    axis.set_title(f"test, {caption}")
    return png(figure)


def roc_pr_png(labels: np.ndarray, scores: np.ndarray, threshold: float, positive: str) -> bytes:
    """ROC and precision-recall curves of class 1's scores, the decision threshold marked."""
    figure, (roc, pr) = pyplot().subplots(1, 2, figsize=(11, 4.5))
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    chosen = scores >= threshold
    tp, fp = np.sum(chosen & (labels == 1)), np.sum(chosen & (labels == 0))
    point = dict(tpr=tp / max(1, np.sum(labels == 1)), fpr=fp / max(1, np.sum(labels == 0)),
                 precision=tp / max(1, tp + fp))
    marker = dict(color="tab:red", zorder=3, label=f"decision threshold {threshold:.3f}")
    roc.plot(fpr, tpr, label=f"AUC {skm.auc(fpr, tpr):.3f}")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc.scatter([point["fpr"]], [point["tpr"]], **marker)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({positive})")
    pr.plot(recall, precision,
            label=f"average precision {skm.average_precision_score(labels, scores):.3f}")
    pr.scatter([point["tpr"]], [point["precision"]], **marker)
    pr.set(xlabel="recall", ylabel="precision", title=f"precision-recall ({positive})")
    for axis in (roc, pr):
        axis.legend(fontsize=8, loc="lower left" if axis is pr else "lower right")
    return png(figure)


def png(figure) -> bytes:
    """The figure as PNG at report.html's resolution; the figure is closed."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    pyplot().close(figure)
    return buffer.getvalue()


def pyplot():
    """matplotlib's pyplot on its file-only backend (a batch job has no display); imported on
    first use, as only the end of a run draws."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as loaded

    return loaded
