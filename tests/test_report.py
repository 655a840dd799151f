"""Scoring a phase: the metrics of each split, the validation-chosen threshold, TTA, weak classes."""
import numpy as np
import pytest

from job import report

THREE = ["cat", "dog", "fox"]


def one_hot_like(rows):
    probabilities = np.asarray(rows, dtype=np.float32)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def test_multiclass_scores_hold_macro_recall_f1_and_top_k_only_below_the_class_count():
    labels = np.array([0, 1, 2, 2])
    probabilities = one_hot_like([[.8, .1, .1], [.1, .8, .1], [.5, .1, .4], [.1, .1, .8]])
    scores = report.classification_metrics(labels, probabilities, THREE)
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["macro_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)  # cat: precision 1/2
    assert scores["top_k_accuracy"] == {}  # 3 classes: top-3 is always right, so not recorded
    ten = report.classification_metrics(np.arange(10), np.eye(10)[::-1].copy(), list("abcdefghij"))
    assert set(ten["top_k_accuracy"]) == {"3", "5"}


def test_two_classes_are_scored_at_the_threshold_chosen_on_validation():
    labels = {"validation": np.array([0, 0, 1, 1]), "test": np.array([0, 1])}
    probabilities = {"validation": np.array([[.1], [.2], [.3], [.4]]),
                     "test": np.array([[.2], [.35]])}
    result = report.score_splits(labels, probabilities, ["no", "yes"])
    assert result["decision_threshold"] == pytest.approx(0.3)
    assert result["test"]["accuracy"] == 0.5  # at 0.5 both are called "no"
    assert result["test"]["at_decision_threshold"]["accuracy"] == 1.0
    assert result["test"]["roc_auc"] == 1.0


def test_a_split_without_images_scores_none():
    labels = {"validation": np.array([0, 1, 2])}
    result = report.score_splits(labels, {"validation": np.eye(3)}, THREE)
    assert result["test"] is None and result["validation"]["accuracy"] == 1.0


def test_tta_scores_the_mean_of_each_image_and_its_flip():
    labels = {"validation": np.array([0, 0, 1, 1, 1]), "test": np.array([0, 1, 1])}
    plain = {name: np.full((len(y), 1), 0.4) for name, y in labels.items()}
    flipped = {name: np.full((len(y), 1), 0.8) for name, y in labels.items()}
    result = report.score_phase(labels, plain, ["a", "b"], flipped)  # means of 0.6: all class 1
    assert result["validation"]["accuracy"] == pytest.approx(3 / 5)
    assert result["test"]["accuracy"] == pytest.approx(2 / 3)
    assert result["validation"]["without_tta"]["accuracy"] == pytest.approx(2 / 5)
    assert "decision_threshold" in result["test"]["without_tta"]


def test_a_class_under_half_the_mean_recall_is_called_weak():
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4)
    predicted = [0] * 4 + [1] * 4 + [2, 0, 0, 0]  # recalls 1, 1, 0.25; mean 0.75
    scores = report.classification_metrics(labels, np.eye(3)[predicted], THREE)
    assert report.weak_classes(scores) == {"fox": 0.25}


def test_the_summary_line_names_auc_and_the_threshold_for_two_classes():
    scores = report.classification_metrics(np.array([0, 1]), np.array([[.2], [.7]]), ["a", "b"])
    scores["at_decision_threshold"] = report.classification_metrics(
        np.array([0, 1]), np.array([[.2], [.7]]), ["a", "b"], 0.6)
    line = report.summary_line(scores)
    assert line.startswith("accuracy 1.0000") and "ROC AUC 1.0000" in line
    assert "threshold 0.600: 1.0000" in line


def test_the_manifest_never_lists_a_temporary_or_partial_file(tmp_path):
    """A writer killed mid-file leaves such names; they are never part of the run."""
    (tmp_path / "saved_model").mkdir()
    for name in ("labels.txt", "saved_model/saved_model.pb",
                 "saved_model/saved_model.pb.tmp6f1c2d3e4b5a69788796a5b4c3d2e1f0",
                 "metrics.json.tmp", "model.keras.partial"):
        (tmp_path / name).write_bytes(b"x")
    assert set(report.write_manifest(tmp_path)["files"]) == {"labels.txt",
                                                             "saved_model/saved_model.pb"}
