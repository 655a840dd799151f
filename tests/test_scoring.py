"""Scoring a phase: the metrics of each split, the validation-chosen threshold, TTA, weak classes."""
import numpy as np
import pytest

from job.results import scoring

THREE = ["cat", "dog", "fox"]


def one_hot_like(rows):
    probabilities = np.asarray(rows, dtype=np.float32)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def test_multiclass_scores_hold_macro_recall_f1_and_top_k_only_below_the_class_count():
    labels = np.array([0, 1, 2, 2])
    probabilities = one_hot_like([[.8, .1, .1], [.1, .8, .1], [.5, .1, .4], [.1, .1, .8]])
    scores = scoring.classification_metrics(labels, probabilities, THREE)
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["macro_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)  # cat: precision 1/2
    assert scores["top_k_accuracy"] == {}  # 3 classes: top-3 is always right, so not recorded
    ten = scoring.classification_metrics(np.arange(10), np.eye(10)[::-1].copy(), list("abcdefghij"))
    assert set(ten["top_k_accuracy"]) == {"3", "5"}


def test_two_classes_are_scored_at_the_threshold_chosen_on_validation():
    per_class = scoring.MIN_THRESHOLD_IMAGES
    labels = {"validation": np.repeat([0, 1], per_class), "test": np.array([0, 1])}
    probabilities = {"validation": np.concatenate([np.linspace(.1, .2, per_class),
                                                   np.linspace(.3, .4, per_class)])[:, None],
                     "test": np.array([[.2], [.35]])}
    result = scoring.score_splits(labels, probabilities, ["no", "yes"])
    assert result["decision_threshold"] == pytest.approx(0.3)
    assert result["evaluation_warnings"] == []
    assert result["test"]["accuracy"] == 0.5  # at 0.5 both are called "no"
    assert result["test"]["at_decision_threshold"]["accuracy"] == 1.0
    assert result["test"]["roc_auc"] == 1.0


def test_too_few_validation_images_of_a_class_keep_the_threshold_at_0_5_with_a_warning():
    # One validation image a class chose 0.9985 in a real run: test accuracy 0.69 at it, 1.0 at 0.5.
    labels = {"validation": np.array([0, 1] + [1] * scoring.MIN_THRESHOLD_IMAGES),
              "test": np.array([0, 0, 1, 1])}
    probabilities = {"validation": np.array([[.99], [.9985]] + [[.9]] * scoring.MIN_THRESHOLD_IMAGES),
                     "test": np.array([[.2], [.6], [.9], [.999]])}
    result = scoring.score_splits(labels, probabilities, ["no", "yes"])
    assert result["decision_threshold"] == 0.5
    assert result["test"]["at_decision_threshold"]["accuracy"] == 0.75
    assert result["evaluation_warnings"] == [
        "decision threshold 0.5, not chosen on validation: it has 1 image(s) of class 'no', "
        f"under the {scoring.MIN_THRESHOLD_IMAGES} per class needed to choose one"]


def test_a_class_missing_from_a_split_is_left_out_of_its_macro_averages_with_a_warning():
    labels = {"validation": np.array([0, 1, 2]), "test": np.array([0, 0, 1, 1])}
    probabilities = {"validation": np.eye(3), "test": np.eye(3)[[0, 0, 1, 1]]}
    result = scoring.score_splits(labels, probabilities, THREE)
    test = result["test"]
    assert test["accuracy"] == 1.0 and test["macro_recall"] == 1.0 and test["macro_f1"] == 1.0
    assert test["classes_without_images"] == ["fox"]
    assert result["validation"]["classes_without_images"] == []
    assert result["evaluation_warnings"] == [
        "test: no images of class(es) ['fox'], so their recall is not measured; test's macro "
        "recall and macro F1 leave them out"]


def test_a_split_without_images_scores_none():
    labels = {"validation": np.array([0, 1, 2])}
    result = scoring.score_splits(labels, {"validation": np.eye(3)}, THREE)
    assert result["test"] is None and result["validation"]["accuracy"] == 1.0


def test_tta_scores_the_mean_of_each_image_and_its_flip():
    labels = {"validation": np.array([0, 0, 1, 1, 1]), "test": np.array([0, 1, 1])}
    plain = {name: np.full((len(y), 1), 0.4) for name, y in labels.items()}
    flipped = {name: np.full((len(y), 1), 0.8) for name, y in labels.items()}
    result = scoring.score_phase(labels, plain, ["a", "b"], flipped)  # means of 0.6: all class 1
    assert result["validation"]["accuracy"] == pytest.approx(3 / 5)
    assert result["test"]["accuracy"] == pytest.approx(2 / 3)
    assert result["validation"]["without_tta"]["accuracy"] == pytest.approx(2 / 5)
    assert "decision_threshold" in result["test"]["without_tta"]


def test_a_class_under_half_the_mean_recall_is_called_weak():
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4)
    predicted = [0] * 4 + [1] * 4 + [2, 0, 0, 0]  # recalls 1, 1, 0.25; mean 0.75
    scores = scoring.classification_metrics(labels, np.eye(3)[predicted], THREE)
    assert scoring.weak_classes(scores) == {"fox": 0.25}


def test_the_summary_line_names_auc_and_the_threshold_for_two_classes():
    scores = scoring.classification_metrics(np.array([0, 1]), np.array([[.2], [.7]]), ["a", "b"])
    scores["at_decision_threshold"] = scoring.classification_metrics(
        np.array([0, 1]), np.array([[.2], [.7]]), ["a", "b"], 0.6)
    line = scoring.summary_line(scores)
    assert line.startswith("accuracy 1.0000") and "ROC AUC 1.0000" in line
    assert "threshold 0.600: 1.0000" in line
