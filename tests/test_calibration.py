"""Calibration (job/training/calibration.py): temperature scaling fitted on validation, folded into the
output layer, and the run's scores recomputed on the calibrated probabilities."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from job.results import scoring
from job.training import calibration

TWO = ["NORMAL", "PNEUMONIA"]


def over_confident(classes: int, images: int, seed: int, sharpen: float = 3.0):
    """(labels, probabilities) of a model whose logits are `sharpen` times the true ones: the
    labels are drawn from softmax(true logits), the probabilities are softmax(sharpen * them)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, (images, classes))
    chances = special.softmax(true_logits, axis=-1)
    labels = np.array([rng.choice(classes, p=row) for row in chances])
    probabilities = special.softmax(sharpen * true_logits, axis=-1).astype(np.float32)
    if classes == 2:  # one sigmoid unit: class 1's probability
        probabilities = probabilities[:, 1:]
    return labels, probabilities


@pytest.mark.parametrize("classes", [2, 5])
def test_the_fitted_temperature_lowers_the_ece_of_an_over_confident_model(classes):
    labels, probabilities = over_confident(classes, 3000, seed=classes)
    test_labels, test_probabilities = over_confident(classes, 3000, seed=classes + 10)
    temperature = calibration.fit_temperature(labels, probabilities)
    assert 2.4 < temperature < 3.6  # the sharpening it undoes is 3
    before = calibration.expected_calibration_error(test_labels, test_probabilities)
    after = calibration.expected_calibration_error(
        test_labels, calibration.scaled(test_probabilities, temperature))
    assert before > 0.05 and after < before / 3


def test_ece_is_the_weighted_gap_between_accuracy_and_confidence_per_bin():
    # Four images at confidence 0.9 (three right), two at 0.6 (both right): bins 13 and 9.
    labels = np.array([1, 1, 1, 0, 0, 0])
    probabilities = np.array([[.9], [.9], [.9], [.9], [.4], [.4]])
    expected = (4 * abs(0.75 - 0.9) + 2 * abs(1.0 - 0.6)) / 6
    assert calibration.expected_calibration_error(labels, probabilities) == pytest.approx(expected)


@pytest.mark.parametrize("classes", [2, 4])
def test_folding_the_temperature_into_the_dense_layer_gives_the_calibrated_probabilities(classes):
    from job.training import model

    head = model.build_head(feature_dim=8, num_classes=classes, dense_units=0, dropout=0.0)
    features = np.random.default_rng(0).normal(0, 3, (64, 8)).astype(np.float32)
    kernel, bias = head.get_layer("probabilities").get_weights()
    logits = (features.astype(np.float64) @ kernel + bias) / 2.5
    calibrated = special.expit(logits) if classes == 2 else special.softmax(logits, axis=-1)
    calibration.fold(head.get_layer("probabilities"), 2.5)
    np.testing.assert_allclose(head.predict(features, verbose=0), calibrated, atol=1e-6)


def test_calibrating_rescores_the_run_and_rechooses_its_threshold_on_calibrated_probabilities():
    from job.training import model

    labels, probabilities = over_confident(2, 400, seed=3)
    scored = calibration.Scored({"validation": labels[:200], "test": labels[200:]},
                                {"validation": probabilities[:200], "test": probabilities[200:]})
    head = model.build_head(feature_dim=4, num_classes=2, dense_units=0, dropout=0.0)
    kernel_before = head.get_layer("probabilities").get_weights()[0]
    calibrated = calibration.calibrate(scored, TWO, head.get_layer("probabilities"), True, None)
    t = calibrated.temperature
    np.testing.assert_allclose(head.get_layer("probabilities").get_weights()[0],
                               kernel_before / t, rtol=1e-6)
    expected = scoring.score_phase(scored.labels, {name: calibration.scaled(p, t) for name, p
                                                  in scored.probabilities.items()}, TWO)
    assert calibrated.scores["decision_threshold"] == expected["decision_threshold"]
    assert calibrated.scores["test"]["loss"] == pytest.approx(expected["test"]["loss"])
    np.testing.assert_allclose(calibrated.test_probabilities,
                               calibration.scaled(probabilities[200:], t))
    record = calibrated.record
    assert record["test_ece_after"] < record["test_ece_before"]
    metrics = {"run": {"decision_threshold": 0.5}, "test": None, "validation": None}
    calibration.apply(metrics, calibrated, "run")
    assert metrics["run"]["decision_threshold"] == expected["decision_threshold"]
    assert metrics["calibration"]["temperature"] == round(t, 4)


def test_too_few_validation_images_leave_the_temperature_at_one(caplog):
    labels, probabilities = over_confident(2, 39, seed=4)  # under 20 per class of 2
    scored = calibration.Scored({"validation": labels}, {"validation": probabilities})
    calibrated = calibration.calibrate(scored, TWO, output_layer=None, chief=True, strategy=None)
    assert calibrated.temperature == 1.0 and calibrated.scores is None
    assert "39 image(s)" in calibrated.record["skipped"]
    assert "calibration skipped (temperature 1)" in caplog.text


def test_a_validation_split_without_mistakes_leaves_the_temperature_at_one(caplog):
    labels = np.repeat([0, 1], 40)
    probabilities = np.where(labels == 1, 0.8, 0.2)[:, None].astype(np.float32)  # all right
    scored = calibration.Scored({"validation": labels}, {"validation": probabilities})
    calibrated = calibration.calibrate(scored, TWO, output_layer=None, chief=True, strategy=None)
    assert calibrated.temperature == 1.0 and "at its bound" in calibrated.record["skipped"]
    assert "calibration skipped (temperature 1)" in caplog.text
