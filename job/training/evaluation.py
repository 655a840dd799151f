"""Scoring: the classifier scored after each phase, and the final phase's predictions kept.

Each worker predicts its shard of the validation and test splits; the probabilities are gathered
whole on every worker and scored by job.results.scoring (`score_phase`: the validation-chosen
threshold, TTA), the result logged. The final phase's predictions stay in memory for what comes
after the phases: temperature scaling (job/training/calibration.py) and report.html's curves and
contact sheet (`test_predictions`); metrics.json keeps only the scores.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge import logs as edge_logs
from job.cluster import distribute
from job.inputs import data
from job.inputs.features import PhaseInputs
from job.results import run_page, scoring
from job.training import calibration

if TYPE_CHECKING:
    from job.training.phases import Phase

log = logging.getLogger("job")


class Scorer:
    """Scores one classifier on one data set after each phase, keeping each phase's predictions
    by the phase's name."""

    def __init__(self, dataset: data.DataSet, strategy, tta: bool):
        self.dataset, self.strategy, self.tta = dataset, strategy, tta
        # The scored splits whole, in the order their probabilities are gathered: (paths
        # relative to the data root, labels).
        self.splits = {
            name: (distribute.gather_texts([str(Path(path).relative_to(dataset.root))
                                            for path in getattr(dataset, name).paths], strategy),
                   distribute.gather_rows(
                       np.asarray(getattr(dataset, name).labels, dtype=np.int32), strategy))
            for name in scoring.SCORED_SPLITS}
        # Per phase name: the test split's probabilities as scored, for report.html.
        self.test_probabilities: dict[str, np.ndarray] = {}
        # Per phase name: its labels and probabilities as scored, which calibration refits.
        self.scored: dict[str, calibration.Scored] = {}

    def evaluate(self, phase: Phase, inputs: PhaseInputs) -> dict:
        """The validation and test scores of the classifier as it stands after a phase (see
        scoring.score_phase), logged."""
        names = [name for name in scoring.SCORED_SPLITS if len(self.splits[name][1])]

        def predict(name: str, flipped: bool):
            """The whole split's probabilities, each worker scoring its shard."""
            if not len(getattr(self.dataset, name)):  # none in this worker's shard
                return distribute.gather_rows(
                    np.zeros((0, *inputs.scored.output_shape[1:]), np.float32), self.strategy)
            return distribute.gather_rows(distribute.predict(
                inputs.scored, inputs.scored_batches(name, flipped), self.strategy), self.strategy)

        labels = {name: self.splits[name][1] for name in names}
        probabilities = {name: predict(name, False) for name in names}
        flipped = {name: predict(name, True) for name in names} if self.tta else None
        result = scoring.score_phase(labels, probabilities, self.dataset.class_names, flipped)
        self.scored[phase.name] = calibration.Scored(labels, probabilities, flipped)
        if "test" in probabilities:  # what score_phase scored: with TTA, the mean with the flip
            self.test_probabilities[phase.name] = probabilities["test"] if flipped is None else \
                (probabilities["test"] + flipped["test"]) / 2
        _log_scores(phase, names, result)
        return result

    def calibrate(self, final: Phase, output_layer, chief: bool) -> calibration.Calibrated:
        """Temperature scaling of the final phase's predictions, folded into output_layer
        (job/training/calibration.py); the calibrated test probabilities become the final
        phase's."""
        calibrated = calibration.calibrate(self.scored[final.name], self.dataset.class_names,
                                           output_layer, chief, self.strategy)
        if calibrated.test_probabilities is not None:
            self.test_probabilities[final.name] = calibrated.test_probabilities
        return calibrated

    def test_predictions(self, final: Phase) -> run_page.TestPredictions | None:
        """The final phase's test probabilities with the test images' paths (relative to the data
        root, as the export finds them again); None without a test split. (Of a cluster's run, the chief has only its own shard's images under the data root: the report
        shows the others' names without a thumbnail until the export, which has them all,
        renders it again.)"""
        probabilities = self.test_probabilities.get(final.name)
        if probabilities is None:
            return None
        root = self.dataset.root
        paths, labels = self.splits["test"]
        return run_page.TestPredictions.of_split([str(root / path) for path in paths],
                                                    labels, probabilities, root)


def _log_scores(phase: Phase, names: list[str], result: dict) -> None:
    for name in names:
        log.info("%s after %s: %s", name, phase, scoring.summary_line(result[name]),
                 extra=edge_logs.fields(phase=str(phase), split=name,
                                        metrics=scoring.headline(result[name])))
        for weak, recall in scoring.weak_classes(result[name]).items():
            log.warning("%s after %s: class %r has recall %.3f, under half the mean "
                        "recall of the classes", name, phase, weak, recall)
    for warning in result["evaluation_warnings"]:
        log.warning("evaluation after %s: %s", phase, warning)
