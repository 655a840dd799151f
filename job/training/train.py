"""Train: one run of the job, from a validated Config to a complete run directory.

The story of Keras' transfer-learning guide, in `run`: build the classifier, a new head on the
frozen conv base (job/training/setup.py); fit the head; unfreeze the base from FINE_TUNE_FROM up,
recompile and fine-tune at a low learning rate (job/training/phases.py; from scratch,
WEIGHTS=none, one phase trains every layer); calibrate and score (job/training/evaluation.py,
job/training/calibration.py); write the run directory and publish it (job/results/outputs.py).
A run that an earlier attempt with the same RUN_ID left unfinished resumes from its checkpoints
(job/training/checkpoint.py); a complete run is left untouched.
"""
from __future__ import annotations

import logging

from common import run_files
from common.record import KEY as RECORD_KEY
from job.cluster import distribute, workers
from job.cluster.context import RunContext
from job.config import Config
from job.inputs import audit
from job.results import identity, outputs, tuning, writer
from job.training import calibration, phases, setup
from job.training.checkpoint import Checkpoints, StopSignal

log = logging.getLogger("job")
ALREADY_COMPLETE = "already complete"


def run(config: Config, context: RunContext, stop: StopSignal | None = None) -> dict:
    """Trains, evaluates and writes one run; returns its metrics (or the finished run's status)."""
    attempt = identity.check_rerun(config)  # exit 2 on other data or settings, complete or not
    if outputs.is_complete(config):
        log.info("run %s is already complete at %s; nothing to do", config.run_id, config.run_uri)
        outputs.tidy_complete(config, context)
        tuning.report_complete(config, context.chief)
        return {"status": ALREADY_COMPLETE, "run_uri": config.run_uri}
    precision = setup.set_up_keras(config, context)
    dataset, pulled = setup.load_data(config, context)
    dropped = None
    if config.drop_cross_split_duplicates:
        dataset, dropped = audit.drop_cross_split_duplicates(dataset, context.strategy)
    whole = workers.WholeData.of(dataset, context)

    with context.strategy.scope():  # variables (model, optimizers, metrics) on every replica
        parts = setup.build_classifier(config, len(dataset.class_names))  # the base frozen
        checkpoints = Checkpoints(context.checkpoint_dir, config.checkpoint_uri, config.run_id,
                                  stop or StopSignal(), writer=context.chief,
                                  retry_deadline=config.storage_deadline)
        identity.hold(context.checkpoint_dir, attempt, config.run_id)
        trainer = phases.Trainer(config, context, dataset, parts, checkpoints)
        planned = phases.plan(config)
        reporter = tuning.Reporter(config, context.chief)  # a tuning trial's figure, each phase
        for phase in planned:  # fit the head; then unfreeze, recompile and fine-tune
            reporter.report(phase.name, trainer.fit(phase, final=phase == planned[-1]))
        calibrated = trainer.scorer.calibrate(planned[-1], parts.head.get_layer("probabilities"),
                                              context.chief)

    # Score: metrics.json, with the calibrated scores, the data audit and every worker's part.
    metrics = outputs.run_metrics(config, precision, dataset, whole, pulled,
                                    context.shard.count, trainer.metrics())
    calibration.apply(metrics, calibrated, RECORD_KEY)
    reporter.report(tuning.FINAL, metrics)  # the published figure, which the study takes
    if reporter.on:
        metrics[tuning.KEY] = reporter.record()
    audited = audit_run(config, context, whole, trainer, dropped)
    metrics[audit.KEY] = audit.summary(audited)
    metrics["workers"] = workers.worker_records(context, dataset, pulled, trainer.records)
    metrics[identity.KEY] = attempt
    log.info("weights digest: %s", distribute.weights_digest(parts.classifier))
    # Write: the run directory, staged, then published by the chief alone.
    writer.fresh_staging(context.run_dir)  # nothing an earlier attempt left is published
    run_files.write_json(context.run_dir / audit.FILE, audited)
    outputs.write_run(context.run_dir, config, parts.classifier, dataset.class_names, metrics,
                      trainer.summaries, trainer.scorer.test_predictions(planned[-1]))
    if not context.chief:
        context.discard_throwaways()
        log.info("worker done; the chief publishes the run")
        return metrics
    outputs.publish_run(config, context, checkpoints)
    return metrics


def audit_run(config: Config, context: RunContext, whole: workers.WholeData,
              trainer: phases.Trainer, dropped: list | None) -> dict:
    """audit.json (job/inputs/audit.py), from the pooled features phase 1's probe fitted on, if
    it was one, and the C it chose; dropped: the exact leaks DROP_CROSS_SPLIT_DUPLICATES left
    out of training (None when it is off)."""
    probe = trainer.records["phase1"].get("probe") or {}
    return audit.audit_run(trainer.dataset,
                           trainer.features.pooled_features() if config.solves_probe else None,
                           probe.get("C"), trainer.class_weights is not None, config.seed,
                           whole.counts, whole.skipped, context.strategy, dropped)
