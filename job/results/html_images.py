"""HTML images: the pictures report.html embeds, each inline as a data URI.

Plots drawn with matplotlib (job.results.report's pyplot, headless) as PNG: the reliability
diagrams, confusion matrices, and ROC and precision-recall curves with the decision threshold
marked; and thumbnails of the data's own images as JPEG, THUMBNAIL_PIXELS on the longer side, in
captioned figures for the contact sheets (the most confident mistakes, the audit's leaks and
label issues). An image that cannot be read gives a note in its place, never an error.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from job.results import report

THUMBNAIL_PIXELS = 96


def pair_figure(first: Path | None, second: Path | None, pair: dict) -> str:
    """Two images the audit found alike (job.inputs.audit), side by side, captioned with how
    alike and the split and path of each."""
    images = "".join(f'<img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" alt="'
                     f'{escaped(name)}">' if data else '<p class="note">(image not available)</p>'
                     for data, name in ((thumbnail(first), pair["a"]),
                                        (thumbnail(second), pair["b"])))
    return (f"<figure>{images}<figcaption>{escaped(pair['kind'])}, similarity "
            f"{pair['similarity']:.3f}<br>{escaped(pair['a_split'])}: {escaped(pair['a'])}<br>"
            f"{escaped(pair['b_split'])}: {escaped(pair['b'])}</figcaption></figure>")


def reliability_plot(diagram: dict) -> str:
    """Accuracy against confidence per bin, before and after calibration, side by side."""
    pyplot = report.pyplot()
    figure, axes = pyplot.subplots(1, 2, figsize=(10, 4.2))
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
    return _figure_image(figure, "reliability diagrams before and after calibration")


def confusion_plot(matrix: np.ndarray, class_names: list[str], caption: str) -> str:
    pyplot = report.pyplot()
    side = min(12, 3.5 + 0.55 * len(class_names))
    figure, axis = pyplot.subplots(figsize=(side, side * 0.85))
    skm.ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=axis, cmap="Blues", colorbar=False, xticks_rotation=45 if len(class_names) > 4 else 0)
    axis.set_title(f"test, {caption}")
    return _figure_image(figure, f"confusion matrix {caption}")


def roc_pr_plot(labels: np.ndarray, scores: np.ndarray, threshold: float, positive: str) -> str:
    """ROC and precision-recall curves of class 1's scores, the decision threshold marked."""
    pyplot = report.pyplot()
    figure, (roc, pr) = pyplot.subplots(1, 2, figsize=(11, 4.5))
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
    return _figure_image(figure, "ROC and precision-recall curves")


def thumbnail_figure(path: Path | None, name: str, truth: str, guess: str,
                      confidence: float, words: tuple[str, str] = ("true", "predicted")) -> str:
    data = thumbnail(path)
    image = (f'<img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" alt="'
             f'{escaped(name)}">' if data else '<p class="note">(image not available)</p>')
    return (f"<figure>{image}<figcaption>{words[0]} <b>{escaped(truth)}</b>, {words[1]} "
            f'<span class="wrong">{escaped(guess)}</span> ({confidence:.3f})<br>'
            f'<span class="note">{escaped(name)}</span></figcaption></figure>')


def thumbnail(path: Path | None) -> bytes | None:
    """The image shrunk to THUMBNAIL_PIXELS on its longer side, as JPEG; None if unreadable."""
    from PIL import Image

    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))  # JPEG: decode small
            small = image.convert("RGB")
            small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    except (OSError, ValueError):
        return None
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _figure_image(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    report.pyplot().close(figure)
    return png_image(buffer.getvalue(), alt)


def png_image(png: bytes, alt: str) -> str:
    return (f'<img class="plot" alt="{escaped(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')


def escaped(value) -> str:
    """value as text safe anywhere in HTML, attribute values included."""
    return html.escape(str(value), quote=True)
