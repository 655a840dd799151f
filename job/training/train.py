"""Train: one run of the job, from a validated Config to a complete run directory.

Phase 1 (feature extraction) trains a new head on a frozen conv base; phase 2 (fine-tuning)
unfreezes the base from FINE_TUNE_FROM up and trains at a low learning rate. What each phase fits
on (the cached outputs of its frozen layers, or the images) is job.inputs.features' concern; how a phase
is scored (validation-chosen threshold, TTA) is job.results.report's. The run directory gets the
SavedModel, labels, metrics (with the run record the export reads), plots and summary, the test
predictions and report.html (job.results.html_report), then MANIFEST.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
import zlib
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import storage
from common.progress import Progress
from common.record import KEY as RECORD_KEY
from common.record import RunRecord
from edge import logs as edge_logs
from edge.runtime import cpu_description
from job.cluster import distribute
from job.cluster.context import RunContext
from job.config import Config, ConfigError
from job.inputs import audit, budget, data
from job.inputs.features import Features, PhaseInputs
from job.inputs.shard import EVERYTHING, Shard
from job.results import html_report, identity, report, writer
from job.training import calibration, model, probe, serving
from job.training.checkpoint import Checkpoints, StopSignal, phase_key
from storage import diskspace

log = logging.getLogger("job")
ALREADY_COMPLETE = "already complete"


class SetupError(Exception):
    """The run cannot start in this environment (e.g. weights that cannot be fetched)."""


def validate(config: Config, context: RunContext) -> None:
    """Checks, before any data is read, what the environment alone cannot: that the places the
    job writes can be written and are its own, that WEIGHTS can be had, and that FINE_TUNE_FROM
    names a layer of the base. Raises SetupError (exit 2) naming the setting at fault."""
    deadline = config.storage_deadline
    checks = {"CACHE_DIR": lambda: storage.claim_cache(config.cache_dir),
              "CHECKPOINT_URI": lambda: storage.claim_owned(config.checkpoint_uri, config.run_id,
                                                            retry_deadline=deadline),
              "WEIGHTS": lambda: weights_file(config)}
    if context.chief:  # the others write nothing
        checks["OUTPUT_URI"] = lambda: storage.check_writable(config.output_uri)
    for name, check in checks.items():
        try:
            check()
        except storage.Unusable as error:
            raise SetupError(f"{name}: {error}") from None
    if config.is_hub_backbone or config.fine_tune_epochs == 0:
        return
    names = model.base_layer_names(config.backbone, config.alpha, config.image_size)
    if config.fine_tune_from not in names:
        conv_names = [n for n in names if "conv" in n or "expand" in n][-6:]
        raise ConfigError(f"FINE_TUNE_FROM={config.fine_tune_from!r} names no layer of "
                          f"{config.backbone}; top layers include {', '.join(conv_names)}")


def weights_file(config: Config) -> str | None:
    """The local path of the .h5 file WEIGHTS names (fetched into the cache if remote), or None
    for WEIGHTS=none or imagenet."""
    if config.weights in ("none", "imagenet"):
        return None
    return str(storage.fetch_file(config.weights, config.cache_dir / "weights",
                                  retry_deadline=config.storage_deadline))


def run(config: Config, context: RunContext, stop: StopSignal | None = None) -> dict:
    """Trains, evaluates and writes one run; returns its metrics (or the finished run's status).

    A run that an earlier attempt with the same RUN_ID left unfinished resumes from its
    checkpoints; a complete run is left untouched.
    """
    attempt = identity.check_rerun(config)  # exit 2 on other data or settings, complete or not
    if storage.exists(storage.join(config.run_uri, report.MANIFEST),
                      retry_deadline=config.storage_deadline):
        log.info("run %s is already complete at %s; nothing to do", config.run_id, config.run_uri)
        tidy_complete(config, context)
        return {"status": ALREADY_COMPLETE, "run_uri": config.run_uri}
    precision = set_up_keras(config, context)
    dataset, pulled = load_data(config, context)
    dropped = None
    if config.drop_cross_split_duplicates:
        dataset, dropped = audit.drop_cross_split_duplicates(dataset, context.strategy)
    whole = WholeData.of(dataset, context)

    with context.strategy.scope():  # variables (model, optimizers, metrics) mirrored across replicas
        base, preprocess_mode = build_base(config)
        parts = model.build_classifier(base, preprocess_mode, len(dataset.class_names),
                                       config.image_size, config.dense_units, config.dropout)
        checkpoints = Checkpoints(context.checkpoint_dir, config.checkpoint_uri, config.run_id,
                                  stop or StopSignal(), writer=context.chief,
                                  retry_deadline=config.storage_deadline)
        identity.hold(context.checkpoint_dir, attempt, config.run_id)
        context.scratch_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(config, dataset, parts, context.scratch_dir, checkpoints,
                          context.strategy, context.shard, context.chief)
        records, summaries = {}, {}
        for phase in phases(config):
            records[phase.key] = trainer.fit(phase, final=phase == phases(config)[-1])
            summaries[phase.key] = _summary(parts.classifier)
        final = phases(config)[-1].name
        calibrated = calibration.calibrate(trainer.scored[final], dataset.class_names,
                                           parts.head.get_layer("probabilities"), context.chief,
                                           context.strategy)
        if calibrated.test_probabilities is not None:
            trainer.test_probabilities[final] = calibrated.test_probabilities

    metrics = run_metrics(config, precision, whole, pulled, trainer, records, summaries)
    calibration.apply(metrics, calibrated, RECORD_KEY)
    audited = audit.audit_run(dataset, trainer.features.pooled_features() if config.solves_probe
                              else None, (records["phase1"].get("probe") or {}).get("C"),
                              trainer.class_weights is not None, config.seed, whole.counts,
                              whole.skipped, context.strategy, dropped)
    metrics[audit.KEY] = audit.summary(audited)
    metrics["workers"] = worker_records(context, dataset, pulled, records)
    metrics[identity.KEY] = attempt
    log.info("weights digest: %s", distribute.weights_digest(parts.classifier))
    writer.fresh_staging(context.run_dir)  # nothing an earlier attempt left is published
    report.write_json(context.run_dir / audit.FILE, audited)
    write_run(context.run_dir, config, parts.classifier, dataset.class_names, metrics, summaries,
              final_test_predictions(dataset.root, trainer, phases(config)[-1]))
    if not context.chief:
        context.discard_throwaways()
        log.info("worker done; the chief publishes the run")
        return metrics
    publish_run(config, context, checkpoints)
    return metrics


def set_up_keras(config: Config, context: RunContext) -> str:
    """Sets the dtype policy MIXED_PRECISION chooses and seeds Keras; returns the policy."""
    strategy = context.strategy
    log.info("strategy: %s, %d replica(s) in sync, %s", type(strategy).__name__,
             strategy.num_replicas_in_sync, context.role)
    precision = choose_precision(config.mixed_precision)
    keras.mixed_precision.set_dtype_policy(precision)
    keras.utils.set_random_seed(config.seed)
    log.info("precision policy: %s (MIXED_PRECISION=%s, GPUs: %d)", precision,
             config.mixed_precision, len(tf.config.list_physical_devices("GPU")))
    return precision


def load_data(config: Config, context: RunContext) -> tuple[data.DataSet,
                                                             storage.TransferStats | None]:
    """This process's data set (pulled into the cache first when DATA_URI is remote), its skipped
    files logged; and the pull's statistics. A worker of a cluster pulls and loads only its shard
    of each class folder (job/inputs/shard.py)."""
    data_root = storage.local_dir_for(config.data_uri, config.cache_dir / "data")
    shard, remote = context.shard, storage.is_remote(config.data_uri)
    pulled = storage.pull_tree(
        config.data_uri, data_root, retry_deadline=config.storage_deadline,
        select=(lambda names: shard.select(names, config.seed)) if shard.is_partial else None) \
        if remote else None
    dataset = data.load_dataset(data_root, config.image_size, config.validation_split,
                                config.test_split, config.seed,
                                shard=EVERYTHING if remote else shard,
                                require_every_class=not shard.is_partial)
    dataset.skipped.update(pulled.skipped if pulled else {})
    for note in dataset.notes:
        log.info("data: %s", note)
    for path, reason in dataset.skipped.items():
        log.warning("skipped %s: %s", path, reason)
    log.info("classes %s; images per split %s; skipped %d%s", dataset.class_names,
             {name: len(getattr(dataset, name)) for name in data.SPLITS}, len(dataset.skipped),
             f" (the shard of {shard.describe()})" if shard.is_partial else "")
    return dataset, pulled


@dataclasses.dataclass(frozen=True)
class WholeData:
    """What the whole data set holds when each worker loaded only its shard: images per class
    and split, and the files skipped, summed over the workers (the shard's own on one machine)."""

    counts: dict[str, dict[str, int]]
    skipped: dict[str, str]

    @classmethod
    def of(cls, dataset: data.DataSet, context: RunContext) -> "WholeData":
        if not context.shard.is_partial:
            return cls(dataset.counts(), dataset.skipped)
        strategy, classes = context.strategy, dataset.class_names
        layout = zlib.crc32(json.dumps([classes, dataset.notes]).encode())
        if distribute.smallest(layout, strategy) != distribute.largest(layout, strategy):
            raise data.DataError("DATA_URI: the workers found different "
                                 "classes or split folders in their shards; each class and split "
                                 "folder needs at least as many images as there are workers")
        counts = distribute.total(np.stack([getattr(dataset, name).label_counts(len(classes))
                                            for name in data.SPLITS]), strategy)
        skipped = distribute.gather_texts(
            [f"{path}\t{reason}" for path, reason in dataset.skipped.items()], strategy)
        whole = cls({name: dict(zip(classes, row.tolist())) for name, row in zip(data.SPLITS, counts)},
                    dict(line.split("\t", 1) for line in skipped))
        missing = [name for name, count in whole.counts["train"].items() if count == 0]
        if missing:
            raise data.DataError(f"DATA_URI: class {missing[0]!r} has no usable training image")
        return whole


def worker_records(context: RunContext, dataset: data.DataSet,
                   pulled: storage.TransferStats | None, records: dict[str, dict]) -> list[dict]:
    """Per worker (the chief first): the images of its shard, the objects and bytes it pulled
    (and found already in its cache), how many inputs ran through its frozen layers and its
    seconds per phase. One entry on one machine."""
    mine = {f"{name}_images": len(getattr(dataset, name)) for name in data.SPLITS}
    mine.update({"objects_pulled": pulled.objects if pulled else 0,
                 "bytes_pulled": pulled.bytes if pulled else 0,
                 "objects_already_cached": pulled.cached if pulled else 0})
    for key, record in records.items():
        mine[f"{key}_frozen_layer_inputs"] = record.get("frozen_layer_inputs", 0)
        mine[f"{key}_seconds"] = record.get("seconds", 0.0)
    rows = distribute.gather_rows(np.array([list(mine.values())], np.float64), context.strategy)
    return [{key: (round(value, 2) if key.endswith("seconds") else int(value))
             for key, value in zip(mine, row)} for row in rows]


def run_metrics(config: Config, precision: str, whole: WholeData,
                pulled: storage.TransferStats | None, trainer: "Trainer",
                records: dict[str, dict], summaries: dict) -> dict:
    """metrics.json: the settings, the environment, the data and each phase's results."""
    final = records.get("phase2") or records["phase1"]
    settings = _config_record(config)
    classes = trainer.dataset.class_names
    record = RunRecord.of_run(settings, classes, precision, final["decision_threshold"],
                              data_shards=trainer.shard.count)
    return {
        "run_id": config.run_id,
        RECORD_KEY: record.as_dict(),
        "config": settings,
        "precision_policy": precision,
        "versions": _versions(),
        "hardware": _hardware(),
        "classes": classes,
        "class_counts": whole.counts,
        "data_pull": pulled.as_dict() if pulled else None,
        "data_notes": trainer.dataset.notes,
        "skipped_files": whole.skipped,
        "class_weights": trainer.class_weights,
        "cache": trainer.features.plan.as_dict(),
        "phase1": records["phase1"],
        "phase2": records.get("phase2"),
        "validation": final["validation"],
        "test": final["test"],
        "decision_threshold": final["decision_threshold"],
        "evaluation_warnings": final.get("evaluation_warnings", []),  # none in older records
        "parameters": {phase: s["parameters"] for phase, s in summaries.items()},
    }


def publish_run(config: Config, context: RunContext, checkpoints: Checkpoints) -> None:
    """The chief's last step: the run to its URI (MANIFEST.json last), the SavedModel also to
    AIP_MODEL_DIR when set, then what the run no longer needs: its checkpoints, scratch and
    staging folder."""
    deadline = config.storage_deadline
    writer.publish(context.claim, context.run_dir, config.run_uri, retry_deadline=deadline)
    if config.model_uri != storage.join(config.run_uri, "saved_model"):
        storage.publish_tree(context.run_dir / "saved_model", config.model_uri,
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


def choose_precision(mode: str) -> str:
    """auto: mixed_float16 on a GPU of compute capability 7.0 or more, float32 otherwise."""
    if mode == "off":
        return "float32"
    if mode in ("float16", "bfloat16"):
        return f"mixed_{mode}"
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if tuple(capability) >= (7, 0):
            return "mixed_float16"
    return "float32"


def build_base(config: Config):
    """The conv base with the weights WEIGHTS names; fails fast when they cannot be had."""
    if config.is_hub_backbone:
        return model.build_base(config.backbone, config.alpha, None, config.image_size)
    weights = "imagenet" if config.weights == "imagenet" else weights_file(config)
    try:
        return model.build_base(config.backbone, config.alpha, weights, config.image_size)
    except Exception as error:  # Keras raises plain Exception when the download fails
        if config.weights == "imagenet":
            raise SetupError(
                f"WEIGHTS=imagenet: could not get the ImageNet weights of {config.backbone} "
                f"({error.__class__.__name__}: {str(error).splitlines()[0][:160]}); set WEIGHTS to a "
                "local path or gs:// URI of the .h5 file, or WEIGHTS=none") from None
        raise SetupError(f"WEIGHTS={config.weights}: does not fit {config.backbone} "
                         f"({str(error).splitlines()[0][:200]})") from None


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase: its name (in logs and checkpoints), epochs and learning rate, what it
    trains (the new head alone, with Adam; the base from FINE_TUNE_FROM up, with RMSprop; or, from
    scratch, every layer, with Adam) and the seed of the augmentation drawn afresh each epoch when
    the frozen layers' outputs are not cached."""

    name: str
    epochs: int
    learning_rate: float
    fine_tunes: bool
    augmentation_seed: int
    from_scratch: bool = False

    @property
    def key(self) -> str:
        """Its name in metrics.json and file names: "phase1", "phase2"."""
        return phase_key(self.name)

    def optimizer(self, steps_per_epoch: int) -> keras.optimizers.Optimizer:
        """Adam for a new head, RMSprop to fine-tune; from scratch, Adam warmed up linearly over
        the first epoch and decayed along a cosine to zero by the last, its gradients clipped:
        random weights at the full rate from the first step sent VGG16's loss to 143 in epoch 1
        (digits, 3e-3) and it never left chance."""
        if self.from_scratch:
            schedule = keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(1, (self.epochs - 1) * steps_per_epoch),
                warmup_target=self.learning_rate, warmup_steps=steps_per_epoch)
            return keras.optimizers.Adam(schedule, clipnorm=1.0)
        kind = keras.optimizers.RMSprop if self.fine_tunes else keras.optimizers.Adam
        return kind(self.learning_rate)


def phases(config: Config) -> list[Phase]:
    """Feature extraction (the base frozen, a new head), then fine-tuning unless it has 0 epochs;
    from scratch (WEIGHTS=none), one phase of HEAD_EPOCHS + FINE_TUNE_EPOCHS that trains every
    layer at HEAD_LEARNING_RATE."""
    if config.from_scratch:
        return [Phase("phase 1", config.head_epochs + config.fine_tune_epochs,
                      config.head_learning_rate, fine_tunes=True, augmentation_seed=config.seed,
                      from_scratch=True)]
    head = Phase("phase 1", config.head_epochs, config.head_learning_rate, fine_tunes=False,
                 augmentation_seed=config.seed)
    fine_tune = Phase("phase 2", config.fine_tune_epochs, config.fine_tune_learning_rate,
                      fine_tunes=True, augmentation_seed=config.seed + 1)
    return [head, fine_tune] if config.fine_tune_epochs > 0 else [head]


class Trainer:
    """Fits the phases of one classifier on one data set and scores each."""

    def __init__(self, config: Config, dataset: data.DataSet, parts: model.Classifier,
                 scratch_dir: Path, checkpoints: Checkpoints, strategy=None,
                 shard: Shard = EVERYTHING, chief: bool = True):
        self.config, self.dataset, self.parts = config, dataset, parts
        self.checkpoints, self.shard, self.chief = checkpoints, shard, chief
        self.strategy = strategy or tf.distribute.get_strategy()
        # BATCH_SIZE is per replica. On one machine tf.data and fit() take the global batch; a
        # worker with a shard batches its own examples per replica (see fit_data).
        self.global_batch = distribute.global_batch_size(config.batch_size, self.strategy)
        batch_size = config.batch_size if shard.is_partial else self.global_batch
        # Each worker measures its own disk and shard; all take the tightest, so all cache alike.
        available = distribute.smallest(budget.available_bytes(config.cache_budget, scratch_dir),
                                        self.strategy)
        self.features = Features(config, dataset, parts, scratch_dir, batch_size, available,
                                 largest=lambda value: distribute.largest(value, self.strategy))
        _log_cache_plan(self.features.plan, config)
        train_counts = distribute.total(dataset.train.label_counts(len(dataset.class_names)),
                                        self.strategy)
        self.class_weights = (data.class_weights(train_counts)
                              if config.class_weights == "auto" and data.is_imbalanced(train_counts)
                              else None)
        # The scored splits whole, in the order their probabilities are gathered: (paths
        # relative to the data root, labels).
        self.scored_splits = {
            name: (distribute.gather_texts([str(Path(path).relative_to(dataset.root))
                                            for path in getattr(dataset, name).paths],
                                           self.strategy),
                   distribute.gather_rows(
                       np.asarray(getattr(dataset, name).labels, dtype=np.int32), self.strategy))
            for name in report.SCORED_SPLITS}
        self.verbose = 1 if sys.stdout.isatty() else 0
        # Per phase name: the test split's probabilities as scored, for report.html (in memory:
        # metrics.json keeps only the scores).
        self.test_probabilities: dict[str, np.ndarray] = {}
        # Per phase name: its labels and probabilities as scored, which calibration refits.
        self.scored: dict[str, calibration.Scored] = {}

    def fit(self, phase: Phase, final: bool = False) -> dict:
        """Trains one phase and returns its record, or restores it when an earlier attempt of
        the run finished it. The final phase restored is scored again (the whole classifier on
        the images), so that calibration, test_predictions.json and promotion have its
        probabilities as in a run never stopped."""
        finished = self.checkpoints.finished(phase.name)
        if finished:
            self.checkpoints.restore(phase.name, self.parts.classifier)
            if final:
                self.evaluate(phase.name, self.features.for_scoring())
            return finished
        if phase.from_scratch:
            model.make_trainable_from_scratch(self.parts.base)
        elif phase.fine_tunes and self.config.is_hub_backbone:
            self.parts.base.trainable = True  # a hub module is fine-tuned whole
        elif phase.fine_tunes:
            model.unfreeze_from(self.parts.base, self.config.fine_tune_from)
        inputs = self.features.for_phase(phase.fine_tunes, phase.augmentation_seed)
        if inputs.cached:
            log.info("%s: outputs of the frozen layers for %d examples ready in %.1f s",
                     phase.name, inputs.cached_examples, inputs.cache_seconds)
        solved = not phase.fine_tunes and self.config.solves_probe
        record = self._solve_probe(phase, inputs) if solved else self._fit(phase, inputs)
        self.checkpoints.finish(phase.name, self.parts.classifier, record)
        return record

    def _fit(self, phase: Phase, inputs: PhaseInputs) -> dict:
        loss, metrics = model.loss_and_metrics(len(self.dataset.class_names),
                                               self.config.label_smoothing)
        train, validation, steps_per_epoch, examples = self.fit_data(inputs)
        inputs.trained.compile(optimizer=phase.optimizer(steps_per_epoch), loss=loss,
                               metrics=metrics)
        callbacks = self.callbacks(phase) + self.checkpoints.callbacks(phase.name)
        history = self.checkpoints.history_so_far(phase.name)
        started = time.perf_counter()
        fitted = inputs.trained.fit(train, validation_data=validation, epochs=phase.epochs,
                                    steps_per_epoch=steps_per_epoch if self.shard.is_partial
                                    else None,
                                    class_weight=None if self.shard.is_partial
                                    else self.class_weights,
                                    callbacks=callbacks, shuffle=False,  # the data shuffles itself
                                    verbose=self.verbose)
        seconds = time.perf_counter() - started
        epochs_now = len(fitted.history.get("loss", []))
        for key, values in fitted.history.items():
            history[key] = history.get(key, []) + [float(v) for v in values]
        scores = self.evaluate(phase.name, inputs)
        return {
            "epochs_run": len(history.get("loss", [])),
            "history": history,
            "cached": inputs.cached,
            "seconds": round(inputs.cache_seconds + time.perf_counter() - started, 2),
            "training_seconds": round(seconds, 2),
            "cache_seconds": round(inputs.cache_seconds, 2),
            "train_examples": examples,
            "frozen_layer_inputs": inputs.cached_examples,
            "images_per_second": round(epochs_now * inputs.train_examples / seconds, 1),
            **scores,
        }

    def fit_data(self, inputs: PhaseInputs) -> tuple[object, object, int, int]:
        """What fit() takes: the training and validation batches and the steps of an epoch; and
        the training examples of all the workers.

        On one machine, inputs' own. A worker with a shard feeds its own examples alone, batched
        per replica (tf.distribute neither splits nor re-batches them), weighted by class here
        (Keras' class_weight cannot map a distributed data set). Every worker must take the same
        number of steps, as the all-reduce needs: the training batches repeat, for as many steps
        an epoch as one machine takes over all the examples at the global batch. Validation runs
        to the end of each worker's shard; tf.distribute gives a worker that runs out first
        empty batches, so the loss and metrics are those of the whole validation split."""
        examples = int(distribute.total(np.int64(inputs.train_examples), self.strategy))
        steps = max(1, -(-examples // self.global_batch))
        if not self.shard.is_partial:
            return inputs.train, inputs.validation, steps, examples
        train = inputs.train
        if self.class_weights is not None:
            weights = tf.constant([self.class_weights[label]
                                   for label in range(len(self.class_weights))], tf.float32)
            train = train.map(lambda x, y: (x, y, tf.gather(weights, tf.cast(y, tf.int32))))
        return (distribute.per_worker(train.repeat(), self.strategy),
                distribute.per_worker(inputs.validation, self.strategy), steps, examples)

    def _solve_probe(self, phase: Phase, inputs: PhaseInputs) -> dict:
        """Phase 1 of a linear head: the linear probe on the unaugmented training features, its
        C chosen on validation, becomes the head's output layer (job.training.probe)."""
        started = time.perf_counter()
        probe_data = {name: tuple(distribute.gather_rows(array, self.strategy)  # every worker's
                                  for array in arrays)
                      for name, arrays in self.features.probe_data().items()}
        fitted = probe.fit(probe_data["train"], probe_data["validation"],
                           balanced=self.class_weights is not None)
        weights = list(fitted.dense_weights())
        if self.shard.is_partial:  # one head on every worker, whatever each one's solver did
            weights = distribute.from_chief(weights, self.chief, self.strategy)
        self.parts.head.get_layer("probabilities").set_weights(weights)
        seconds = time.perf_counter() - started
        log.info("%s: linear probe on %d training images, C=%g chosen on validation (accuracy "
                 "%.4f) in %.1f s", phase.name, len(probe_data["train"][1]), fitted.c,
                 fitted.validation_accuracy, seconds,
                 extra=edge_logs.fields(phase=phase.name, metrics={
                     "C": fitted.c, "val_accuracy": fitted.validation_accuracy}))
        if fitted.unconverged:
            log.warning("%s: the probe's solver did not converge for C in %s", phase.name,
                        fitted.unconverged)
        return {
            "epochs_run": 0, "history": {}, "cached": inputs.cached,
            "probe": {"C": fitted.c, "unconverged_C": fitted.unconverged,
                      "validation_accuracy": round(fitted.validation_accuracy, 4)},
            "seconds": round(inputs.cache_seconds + seconds, 2),
            "training_seconds": round(seconds, 2), "cache_seconds": round(inputs.cache_seconds, 2),
            "train_examples": len(probe_data["train"][1]),
            "frozen_layer_inputs": inputs.cached_examples,
            **self.evaluate(phase.name, inputs),
        }

    def callbacks(self, phase: Phase) -> list[keras.callbacks.Callback]:
        callbacks = [
            # From scratch the first epochs' validation loss jumps while BatchNormalization's
            # statistics settle (intel_scenes: up for three epochs, then below the first); they
            # do not count towards stopping.
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.config.patience,
                                          restore_best_weights=True,
                                          start_from_epoch=self.config.patience
                                          if phase.from_scratch else 0),
            EpochLog(phase.name, phase.epochs),
            EpochProgress(phase.name),
        ]
        if phase.fine_tunes and not phase.from_scratch:  # lowered further when validation stalls
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.2, patience=max(1, self.config.patience - 1),
                min_lr=phase.learning_rate / 100))
        if self.config.tensorboard_uri:
            callbacks.append(keras.callbacks.TensorBoard(
                log_dir=storage.join(self.config.tensorboard_uri, phase.key)))
        return callbacks

    def evaluate(self, phase: str, inputs: PhaseInputs) -> dict:
        """The validation and test scores of the classifier as it stands after a phase (see
        report.score_phase), logged."""
        names = [name for name in report.SCORED_SPLITS if len(self.scored_splits[name][1])]

        def predict(name: str, flipped: bool):
            """The whole split's probabilities, each worker scoring its shard."""
            if not len(getattr(self.dataset, name)):  # none in this worker's shard
                return distribute.gather_rows(
                    np.zeros((0, *inputs.scored.output_shape[1:]), np.float32), self.strategy)
            return distribute.gather_rows(distribute.predict(
                inputs.scored, inputs.scored_batches(name, flipped), self.strategy), self.strategy)

        labels = {name: self.scored_splits[name][1] for name in names}
        probabilities = {name: predict(name, False) for name in names}
        flipped = {name: predict(name, True) for name in names} if self.config.tta else None
        result = report.score_phase(labels, probabilities, self.dataset.class_names, flipped)
        self.scored[phase] = calibration.Scored(labels, probabilities, flipped)
        if "test" in probabilities:  # what score_phase scored: with TTA, the mean with the flip
            self.test_probabilities[phase] = probabilities["test"] if flipped is None else \
                (probabilities["test"] + flipped["test"]) / 2
        for name in names:
            log.info("%s after %s: %s", name, phase, report.summary_line(result[name]),
                     extra=edge_logs.fields(phase=phase, split=name,
                                            metrics=report.headline(result[name])))
            for weak, recall in report.weak_classes(result[name]).items():
                log.warning("%s after %s: class %r has recall %.3f, under half the mean "
                            "recall of the classes", name, phase, weak, recall)
        for warning in result["evaluation_warnings"]:
            log.warning("evaluation after %s: %s", phase, warning)
        return result


class EpochProgress(keras.callbacks.Callback):
    """Within an epoch that runs long, a line every PROGRESS_SECONDS: batches done, rate, ETA.

    Never a bar of its own: where Keras draws its bar (fit's verbose=1, on a terminal) this adds
    nothing, neither a second bar nor lines across Keras'; elsewhere it logs its plain lines."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase, self.progress = phase, None

    def on_epoch_begin(self, epoch, logs=None):
        keras_draws = bool(self.params.get("verbose"))
        self.progress = None if keras_draws else Progress(
            f"{self.phase} epoch {epoch + 1}", self.params.get("steps") or 0, "batches", log,
            fraction=None, bar=False)

    def on_train_batch_end(self, batch, logs=None):
        if self.progress is not None:
            self.progress.advance()


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch with its metrics."""

    def __init__(self, phase: str, epochs: int):
        super().__init__()
        self.phase, self.epochs = phase, epochs

    def on_epoch_end(self, epoch, logs=None):
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        values = " ".join(f"{key}={value:.4f}" for key, value in metrics.items())
        log.info("%s epoch %d/%d: %s", self.phase, epoch + 1, self.epochs, values,
                 extra=edge_logs.fields(phase=self.phase, epoch=epoch + 1, epochs=self.epochs,
                                        metrics=metrics))


def _log_cache_plan(plan: budget.CachePlan, config: Config) -> None:
    sizes = ", ".join(f"{phase} {diskspace.size_text(size)}" for phase, size in plan.phase_bytes.items())
    uncached = ("none: WEIGHTS=none freezes no layer" if config.from_scratch
                else "not cached: CACHE_FEATURES=0")
    log.info("cache: decoded images %s; frozen layers' outputs %s; CACHE_BUDGET %s: %s",
             diskspace.size_text(plan.decoded_images_bytes), sizes or uncached,
             plan.budget, diskspace.size_text(plan.available_bytes))
    for refusal in plan.refusals():
        log.warning("cache: %s", refusal)


def final_test_predictions(data_root: Path, trainer: Trainer,
                           final: Phase) -> html_report.TestPredictions | None:
    """The final phase's test probabilities with the test images' paths (relative to the data
    root, as the export finds them again); None without a test split. (Of a cluster's run,
    the chief has only its own shard's images under data_root: the report shows the others'
    names without a thumbnail until the export, which has them all, renders it again.)"""
    probabilities = trainer.test_probabilities.get(final.name)
    if probabilities is None:
        return None
    paths, labels = trainer.scored_splits["test"]
    return html_report.TestPredictions.of_split([str(data_root / path) for path in paths],
                                                labels, probabilities, data_root)


def write_run(work_dir: Path, config: Config, classifier: keras.Model, class_names: list[str],
              metrics: dict, summaries: dict,
              predictions: html_report.TestPredictions | None = None) -> None:
    """Writes every output file; MANIFEST.json, last, marks the run complete. report.html draws
    its ROC/PR curves and contact sheet from predictions, also kept as test_predictions.json so
    that the export can render it again; without them the page says they are missing."""
    diskspace.require(work_dir, diskspace.model_files_bytes(classifier),
                      "the run's saved_model/ and model.keras")
    serving.export(classifier, str(work_dir / "saved_model"), class_names,
                   metrics["decision_threshold"])
    classifier.save(work_dir / "model.keras")
    (work_dir / "labels.txt").write_text("\n".join(class_names) + "\n")
    for phase in ("phase1", "phase2"):
        if (metrics.get(phase) or {}).get("history"):  # a phase solved as a probe has no epochs
            report.plot_history(metrics[phase]["history"], phase.replace("phase", "phase "),
                                work_dir / f"curves_{phase}.png")
    (work_dir / "model_summary.txt").write_text("\n\n".join(
        f"== after {phase} ==\n{s['text']}\n{s['parameters']}" for phase, s in summaries.items()))
    report.write_json(work_dir / "metrics.json", metrics)
    if predictions is not None:
        html_report.write_predictions(work_dir / html_report.PREDICTIONS, predictions)
    html_report.write_report(work_dir / html_report.REPORT, metrics, predictions)
    report.write_manifest(work_dir)


def _summary(classifier: keras.Model) -> dict:
    lines: list[str] = []
    classifier.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=100)
    return {"text": "\n".join(lines), "parameters": model.parameter_counts(classifier)}


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
