"""Scoring: the metrics of a phase's predictions on the validation and test splits.

Pure functions (labels and probabilities in, metrics out): accuracy, loss, per-class figures,
the decision threshold chosen on validation (two classes), TTA's mean with the flipped images,
and the warnings that say when a figure is less than it seems.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from edge.runtime import predict_labels

SCORED_SPLITS = ("validation", "test")
TOP_K = (3, 5)  # top-k accuracies recorded where there are more than k classes
WEAK_RECALL = 0.5  # a class whose recall is under this share of the mean is called out
# Validation images per class below which no decision threshold is chosen (it stays 0.5): with
# fewer, one image moves that class's recall by more than 5 points, and the threshold chosen
# follows a handful of images (one a class chose 0.9985: test accuracy 0.69 at it, 1.0 at 0.5).
MIN_THRESHOLD_IMAGES = 20


def score_phase(labels: dict[str, np.ndarray], probabilities: dict[str, np.ndarray],
                class_names: list[str],
                flipped: dict[str, np.ndarray] | None = None) -> dict:
    """The scores of a phase's predictions on the validation and test splits.

    With TTA, flipped holds the predictions on the horizontally flipped images: the scores are
    those of the mean of each image and its flip, and each split also records its scores without
    TTA (at their own decision threshold) as "without_tta".
    """
    if flipped is None:
        return score_splits(labels, probabilities, class_names)
    result = score_splits(labels, {name: (probabilities[name] + flipped[name]) / 2
                                   for name in probabilities}, class_names)
    without_tta = score_splits(labels, probabilities, class_names)
    for name in probabilities:
        result[name]["without_tta"] = {**without_tta[name],
                                       "decision_threshold": without_tta["decision_threshold"]}
    return result


def score_splits(labels: dict[str, np.ndarray], probabilities: dict[str, np.ndarray],
                 class_names: list[str]) -> dict:
    """Metrics of each scored split (None where it has no images), the decision threshold, and
    "evaluation_warnings": why some of these figures are less than they seem.

    For two classes the threshold that maximises balanced accuracy on the validation split is
    chosen (unless validation has too few images of a class: threshold_problem), and each split is
    scored at 0.5 and, as "at_decision_threshold", at that threshold.
    """
    two_classes = len(class_names) == 2
    threshold = 0.5
    warnings = missing_class_warnings(labels, probabilities, class_names)
    if two_classes and "validation" in probabilities:
        threshold = balanced_threshold(labels["validation"], probabilities["validation"][:, 0])
        problem = threshold_problem(labels["validation"], class_names)
        warnings += [problem] if problem else []
    result: dict = {"decision_threshold": threshold, "evaluation_warnings": warnings}
    for name in SCORED_SPLITS:
        if name not in probabilities:
            result[name] = None
            continue
        scores = classification_metrics(labels[name], probabilities[name], class_names)
        if two_classes:
            scores["at_decision_threshold"] = classification_metrics(
                labels[name], probabilities[name], class_names, threshold)
        result[name] = scores
    return result


def threshold_problem(labels: np.ndarray, class_names: list[str]) -> str | None:
    """Why these validation labels of two classes cannot choose the decision threshold, or None."""
    counts = np.bincount(np.asarray(labels).astype(int), minlength=len(class_names))
    fewest = int(np.argmin(counts))
    if counts[fewest] >= MIN_THRESHOLD_IMAGES:
        return None
    return (f"decision threshold 0.5, not chosen on validation: it has {counts[fewest]} image(s) "
            f"of class {class_names[fewest]!r}, under the {MIN_THRESHOLD_IMAGES} per class needed "
            "to choose one")


def missing_class_warnings(labels: dict[str, np.ndarray], probabilities: dict[str, np.ndarray],
                           class_names: list[str]) -> list[str]:
    """One line per scored split that lacks images of some class: their recall cannot be
    measured there, so that split's macro averages leave them out (classification_metrics)."""
    warnings = []
    for name in SCORED_SPLITS:
        if name not in probabilities:
            continue
        counts = np.bincount(np.asarray(labels[name]).astype(int), minlength=len(class_names))
        missing = [class_names[index] for index in np.flatnonzero(counts == 0)]
        if missing:
            warnings.append(f"{name}: no images of class(es) {missing}, so their recall is not "
                            f"measured; {name}'s macro recall and macro F1 leave them out")
    return warnings


def headline(scores: dict) -> dict[str, float]:
    """A split's headline figures as numbers: accuracy, loss, macro recall, ROC AUC (two classes)
    and the accuracy at the decision threshold."""
    figures = {key: scores[key] for key in ("accuracy", "loss", "macro_recall", "roc_auc")
               if scores.get(key) is not None}
    if "at_decision_threshold" in scores:
        figures["accuracy_at_threshold"] = scores["at_decision_threshold"]["accuracy"]
    return figures


def summary_line(scores: dict) -> str:
    """One split's scores as a log line: accuracy and loss, for two classes ROC AUC and the
    accuracy at the decision threshold."""
    line = (f"accuracy {scores['accuracy']:.4f}, loss {scores['loss']:.4f}, macro recall "
            f"{scores['macro_recall']:.4f}")
    if scores.get("roc_auc") is None:
        return line
    at_threshold = scores["at_decision_threshold"]
    return (f"{line}, ROC AUC {scores['roc_auc']:.4f}, accuracy at threshold "
            f"{at_threshold['threshold']:.3f}: {at_threshold['accuracy']:.4f}")


def weak_classes(scores: dict) -> dict[str, float]:
    """The classes (with their recall) whose recall is under WEAK_RECALL of the mean recall: the
    ones a good overall accuracy hides."""
    recalls = {name: figures["recall"] for name, figures in scores["per_class"].items()
               if figures["support"]}
    mean = float(np.mean(list(recalls.values()))) if recalls else 0.0
    return {name: recall for name, recall in recalls.items() if recall < WEAK_RECALL * mean}


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           class_names: list[str], threshold: float = 0.5) -> dict:
    """Accuracy, log loss, per-class precision/recall/F1, confusion matrix, ROC AUC (two classes).
    The macro averages are over the classes with images here ("classes_without_images" lists the
    others): a class with none has no recall to average, and counting it as 0 would read as a
    class the model misses (macro recall 0.5 at 100 % accuracy)."""
    labels = np.asarray(labels).astype(int)
    predicted = predict_labels(probabilities, threshold)
    class_probabilities = _class_probabilities(probabilities)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=range(len(class_names)), zero_division=0)
    present = support > 0
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
        "macro_recall": float(np.mean(recall[present])) if present.any() else None,
        "macro_f1": float(np.mean(f1[present])) if present.any() else None,
        "classes_without_images": [name for name, has in zip(class_names, present) if not has],
    }
    if len(labels):
        result["top_k_accuracy"] = {
            str(k): float(skm.top_k_accuracy_score(labels, class_probabilities, k=k,
                                                   labels=range(len(class_names))))
            for k in TOP_K if k < len(class_names)}
    if len(class_names) == 2:
        result["threshold"] = threshold
        result["roc_auc"] = (float(skm.roc_auc_score(labels, class_probabilities[:, 1]))
                             if len(set(labels.tolist())) == 2 else None)
    return result


def balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold on class-1 scores with the best balanced accuracy (Youden's J) on these
    labels; 0.5 where a class has fewer than MIN_THRESHOLD_IMAGES of them."""
    labels = np.asarray(labels).astype(int)
    if np.bincount(labels, minlength=2).min() < MIN_THRESHOLD_IMAGES:
        return 0.5
    false_positive_rate, true_positive_rate, thresholds = skm.roc_curve(labels, scores)
    best = int(np.argmax(true_positive_rate - false_positive_rate))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def _class_probabilities(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[-1] == 1:
        return np.concatenate([1 - probabilities, probabilities], axis=-1)
    return probabilities / probabilities.sum(axis=-1, keepdims=True)  # float32 softmax rounding
