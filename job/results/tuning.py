"""Tuning: the figure a Vertex AI hyperparameter tuning trial is judged by, reported and recorded.

In a tuning trial (CLOUD_ML_TRIAL_ID set, or CLOUD_ML_HP_METRIC_FILE), the chief reports the
validation split's TUNING_METRIC (tag `validation_<metric>`, the study spec's metricId) through
cloudml-hypertune after each phase and once at the end, and metrics.json records the same figures
under "tuning". The final report is the run's published validation figure (after calibration);
the study takes each trial's last report (measurementSelectionType LAST_MEASUREMENT in
infra/vertex/hptuningjob.yaml); the phase reports show a trial's progress.

Validation, never test: the tuning service keeps the settings whose reported figure is best, so
a figure it saw has been chosen on. Reported on test, the chosen run's test figures would be
optimistic, and they are what the promotion rule and README's quality figures rely on being
unseen. The validation split already chooses the probe's C, early stopping and the threshold.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hypertune

import storage
from common import run_files
from job.config import Config, ConfigError
from storage import objects

KEY = "tuning"  # its key in metrics.json
FINAL = "final"  # the last report's phase
SPLIT = "validation"

log = logging.getLogger("job")


def tag(metric: str) -> str:
    """The name the figure is reported under: the study spec's metricId."""
    return f"{SPLIT}_{metric}"


class Reporter:
    """The reports of one run. Off (reports nothing, records nothing) outside a tuning trial;
    only the chief writes the metric file, every process keeps the record."""

    def __init__(self, config: Config, chief: bool):
        self.on = config.reports_tuning_metric
        self.metric, self.tag, self.trial_id = config.tuning_metric, tag(config.tuning_metric), \
            config.trial_id
        self.reports: list[dict] = []
        self.hypertune = _hypertune(config) if self.on and chief else None

    def report(self, phase: str, scores: dict) -> None:
        """Reports the validation figure of scores (a phase's record, or metrics.json's final
        figures) as the next step. Raises ConfigError (exit 2) when there is no such figure."""
        if not self.on:
            return
        value = (scores.get(SPLIT) or {}).get(self.metric)
        if value is None:
            raise ConfigError(f"TUNING_METRIC={self.metric}: the validation split has no images "
                              f"to score after {phase}, so this trial has no figure to report; "
                              "set VALIDATION_SPLIT above 0 or give DATA_URI a validation/ folder")
        step = len(self.reports) + 1
        self.reports.append({"phase": phase, "global_step": step, "value": float(value)})
        if self.hypertune is not None:
            self.hypertune.report_hyperparameter_tuning_metric(self.tag, float(value),
                                                               global_step=step)
            log.info("tuning metric %s after %s: %.4f (trial %s, step %d)", self.tag, phase,
                     value, self.trial_id or "-", step)

    def record(self) -> dict | None:
        """metrics.json's "tuning" block: every report, and the final value; None when off."""
        if not self.on or not self.reports:
            return None
        return {"metric": self.tag, "trial_id": self.trial_id, "reports": self.reports,
                "value": self.reports[-1]["value"]}


def report_complete(config: Config, chief: bool) -> None:
    """A trial restarted after its run was complete reports the recorded final figure again:
    the metric file lived on the machine that was lost, and the study needs a report."""
    if not (config.reports_tuning_metric and chief):
        return
    content = objects.read(storage.join(config.run_uri, run_files.METRICS),
                           retry_deadline=config.storage_deadline)
    metrics = json.loads(content) if content else {}
    Reporter(config, chief).report(FINAL, metrics)


def _hypertune(config: Config) -> hypertune.HyperTune:
    """The library's reporter, pointed at the file and trial of the Config (the library reads
    CLOUD_ML_HP_METRIC_FILE and CLOUD_ML_TRIAL_ID itself; here they come from job/config.py like
    every setting, which in a trial are the same variables)."""
    reporter = hypertune.HyperTune()
    if config.hp_metric_file:
        Path(config.hp_metric_file).parent.mkdir(parents=True, exist_ok=True)
        reporter.metric_path = config.hp_metric_file
    reporter.trial_id = config.trial_id or reporter.trial_id
    return reporter
