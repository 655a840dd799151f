"""Outputs: what a run writes and how it leaves the machine.

A run is staged in the cache (RunContext.run_dir): the SavedModel (job/training/serving.py) and
model.keras, labels.txt, metrics.json (`run_metrics`: the settings, the environment, the data and
what training recorded, with the run record the export reads), the training curves, the model
summaries, test_predictions.json and report.html (job/results/run_page.py), then
MANIFEST.json, which marks the run complete (`write_run`). The chief publishes it under its claim
(job/results/writer.py) and removes what the run no longer needs (`publish_run`); a rerun of a
complete run only tidies what an attempt killed after completing it left (`tidy_complete`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import storage
from common import run_files
from common.record import KEY as RECORD_KEY
from common.record import RunRecord
from edge.runtime import cpu_description
from job.cluster.context import RunContext
from job.cluster.workers import WholeData
from job.config import Config
from job.inputs import data
from job.results import plots, run_page, writer
from job.training import serving
from job.training.checkpoint import Checkpoints
from storage import diskspace

log = logging.getLogger("job")


def is_complete(config: Config) -> bool:
    """Whether the run is complete at its URI: its MANIFEST.json is there."""
    return storage.exists(storage.join(config.run_uri, run_files.MANIFEST),
                          retry_deadline=config.storage_deadline)


def run_metrics(config: Config, precision: str, dataset: data.DataSet, whole: WholeData,
                pulled: storage.TransferStats | None, data_shards: int, trained: dict) -> dict:
    """metrics.json: the settings, the environment, the data (whole: every worker's) and what
    training recorded (trained: job.training.phases.Trainer.metrics)."""
    settings = _config_record(config)
    record = RunRecord.of_run(settings, dataset.class_names, precision,
                              trained["decision_threshold"], data_shards=data_shards)
    return {
        "run_id": config.run_id,
        RECORD_KEY: record.as_dict(),
        "config": settings,
        "precision_policy": precision,
        "versions": _versions(),
        "hardware": _hardware(),
        "classes": dataset.class_names,
        "class_counts": whole.counts,
        "data_pull": pulled.as_dict() if pulled else None,
        "data_notes": dataset.notes,
        "skipped_files": whole.skipped,
        **trained,
    }


def write_run(work_dir: Path, config: Config, classifier: keras.Model, class_names: list[str],
              metrics: dict, summaries: dict,
              predictions: run_page.TestPredictions | None = None) -> None:
    """Writes every output file; MANIFEST.json, last, marks the run complete. report.html draws
    its ROC/PR curves and contact sheet from predictions, also kept as test_predictions.json so
    that the export can render it again; without them the page says they are missing.
    summaries: the model's summary after each phase, by the phase's name."""
    diskspace.require(work_dir, diskspace.model_files_bytes(classifier),
                      "the run's saved_model/ and model.keras")
    serving.export(classifier, str(work_dir / run_files.SAVED_MODEL), class_names,
                   metrics["decision_threshold"])
    classifier.save(work_dir / run_files.KERAS_MODEL)
    (work_dir / run_files.LABELS).write_text("\n".join(class_names) + "\n")
    for phase in ("phase1", "phase2"):
        if (metrics.get(phase) or {}).get("history"):  # a phase solved as a probe has no epochs
            plots.plot_history(metrics[phase]["history"], phase.replace("phase", "phase "),
                                work_dir / f"curves_{phase}.png")
    (work_dir / "model_summary.txt").write_text("\n\n".join(
        f"== after {phase} ==\n{s['text']}\n{s['parameters']}" for phase, s in summaries.items()))
    run_files.write_json(work_dir / run_files.METRICS, metrics)
    if predictions is not None:
        run_page.write_predictions(work_dir / run_files.PREDICTIONS, predictions)
    run_page.write_page(work_dir / run_files.RUN_PAGE, metrics, predictions)
    run_files.write_manifest(work_dir)


def publish_run(config: Config, context: RunContext, checkpoints: Checkpoints) -> None:
    """The chief's last step: the run to its URI (MANIFEST.json last), the SavedModel also to
    AIP_MODEL_DIR when set, then what the run no longer needs: its checkpoints, scratch and
    staging folder."""
    deadline = config.storage_deadline
    writer.publish(context.claim, context.run_dir, config.run_uri, retry_deadline=deadline)
    if config.model_uri != storage.join(config.run_uri, run_files.SAVED_MODEL):
        storage.publish_tree(context.run_dir / run_files.SAVED_MODEL, config.model_uri,
                             retry_deadline=deadline)
    log.info("run complete: %s", config.run_uri)
    checkpoints.clear()
    if not config.promote_uri:  # promotion reads the decoded test images, then removes them
        shutil.rmtree(context.scratch_dir, ignore_errors=True)
    shutil.rmtree(context.run_dir, ignore_errors=True)


def tidy_complete(config: Config, context: RunContext) -> None:
    """What an attempt killed after completing the run left (the chief's): the checkpoints this
    RUN_ID recorded writing (storage.clear_owned), its claim, and its folders in the cache (the
    decoded test images stay while a promotion may still need them: it removes them)."""
    if not context.chief:
        return
    storage.clear_owned(config.checkpoint_uri, config.run_id,
                        retry_deadline=config.storage_deadline)
    writer.remove_leftover_claim(config.run_uri, retry_deadline=config.storage_deadline)
    kept = {context.scratch_dir} if config.promote_uri else set()
    for folder in {context.checkpoint_dir, context.scratch_dir, context.run_dir} - kept:
        shutil.rmtree(folder, ignore_errors=True)


def _config_record(config: Config) -> dict:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(config).items()}


def _versions() -> dict:
    import sklearn

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def _hardware() -> dict:
    import psutil

    return {"platform": platform.platform(), "cpu": cpu_description(), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpus": [gpu.name for gpu in tf.config.list_physical_devices("GPU")]}
