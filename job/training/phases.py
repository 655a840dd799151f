"""Phases: the phases of transfer learning, and how one phase is fitted.

Feature extraction trains a new head on the frozen conv base; fine-tuning unfreezes the base
from FINE_TUNE_FROM up, recompiles and trains at a low learning rate; from scratch (WEIGHTS=none)
one phase trains every layer (`plan`). `Trainer.fit` runs one phase: it restores the phase when
an earlier attempt of the run finished it (job/training/checkpoint.py); otherwise it sets what the
phase trains, fits it (or, for the default linear head, solves phase 1 as a linear probe,
job/training/probe.py) with its callbacks, scores it (job/training/evaluation.py) and checkpoints it.
What a phase fits on (the cached outputs of its frozen layers, or the images) is
job/inputs/features.py's concern.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import storage
from common.progress import Progress
from edge import logs as edge_logs
from job.cluster import distribute
from job.cluster.context import RunContext
from job.config import Config
from job.inputs import budget, data
from job.inputs.features import Features, PhaseInputs
from job.training import model, probe
from job.training.checkpoint import Checkpoints
from job.training.evaluation import Scorer
from storage import diskspace

log = logging.getLogger("job")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase: its number, epochs and learning rate, what it trains (the new head
    alone, with Adam; the base from FINE_TUNE_FROM up, with RMSprop; or, from scratch, every
    layer, with Adam) and the seed of the augmentation drawn afresh each epoch when the frozen
    layers' outputs are not cached. Its name, "phase1", keys it in metrics.json, the cache plan
    and file names; logs write it "phase 1" (str)."""

    number: int
    epochs: int
    learning_rate: float
    fine_tunes: bool
    augmentation_seed: int
    from_scratch: bool = False

    @property
    def name(self) -> str:
        return f"phase{self.number}"

    def __str__(self) -> str:
        return f"phase {self.number}"

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


def plan(config: Config) -> list[Phase]:
    """Feature extraction (the base frozen, a new head), then fine-tuning unless it has 0 epochs;
    from scratch (WEIGHTS=none), one phase of HEAD_EPOCHS + FINE_TUNE_EPOCHS that trains every
    layer at HEAD_LEARNING_RATE."""
    if config.from_scratch:
        return [Phase(1, config.head_epochs + config.fine_tune_epochs, config.head_learning_rate,
                      fine_tunes=True, augmentation_seed=config.seed, from_scratch=True)]
    head = Phase(1, config.head_epochs, config.head_learning_rate, fine_tunes=False,
                 augmentation_seed=config.seed)
    fine_tune = Phase(2, config.fine_tune_epochs, config.fine_tune_learning_rate,
                      fine_tunes=True, augmentation_seed=config.seed + 1)
    return [head, fine_tune] if config.fine_tune_epochs > 0 else [head]


class Trainer:
    """Fits the phases of one classifier on this process's data set and scores each, keeping
    per phase name its record (metrics.json's "phase1", "phase2") and the model's summary."""

    def __init__(self, config: Config, context: RunContext, dataset: data.DataSet,
                 parts: model.Classifier, checkpoints: Checkpoints):
        self.config, self.dataset, self.parts, self.checkpoints = config, dataset, parts, checkpoints
        self.strategy, self.shard, self.chief = context.strategy, context.shard, context.chief
        # BATCH_SIZE is per replica. On one machine tf.data and fit() take the global batch; a
        # worker with a shard batches its own examples per replica (see fit_data).
        self.global_batch = distribute.global_batch_size(config.batch_size, self.strategy)
        batch_size = config.batch_size if self.shard.is_partial else self.global_batch
        # Each worker measures its own disk and shard; all take the tightest, so all cache alike.
        context.scratch_dir.mkdir(parents=True, exist_ok=True)
        available = distribute.smallest(
            budget.available_bytes(config.cache_budget, context.scratch_dir), self.strategy)
        self.features = Features(config, dataset, parts, context.scratch_dir, batch_size,
                                 available,
                                 largest=lambda value: distribute.largest(value, self.strategy))
        _log_cache_plan(self.features.plan, config)
        train_counts = distribute.total(dataset.train.label_counts(len(dataset.class_names)),
                                        self.strategy)
        self.class_weights = (data.class_weights(train_counts)
                              if config.class_weights == "auto" and data.is_imbalanced(train_counts)
                              else None)
        self.scorer = Scorer(dataset, self.strategy, config.tta)
        self.verbose = 1 if sys.stdout.isatty() else 0
        self.records: dict[str, dict] = {}
        self.summaries: dict[str, dict] = {}

    def fit(self, phase: Phase, final: bool = False) -> dict:
        """Trains one phase and returns its record, or restores it when an earlier attempt of
        the run finished it. The final phase restored is scored again (the whole classifier on
        the images), so that calibration, test_predictions.json and promotion have its
        probabilities as in a run never stopped."""
        record = self.checkpoints.finished(phase)
        if record:
            self.checkpoints.restore(phase, self.parts.classifier)
            if final:
                self.scorer.evaluate(phase, self.features.for_scoring())
        else:
            self.unfreeze(phase)
            inputs = self.features.for_phase(phase.fine_tunes, phase.augmentation_seed)
            if inputs.cached:
                log.info("%s: outputs of the frozen layers for %d examples ready in %.1f s",
                         phase, inputs.cached_examples, inputs.cache_seconds)
            solved = not phase.fine_tunes and self.config.solves_probe
            record = self._solve_probe(phase, inputs) if solved else self._fit(phase, inputs)
            self.checkpoints.finish(phase, self.parts.classifier, record)
        self.records[phase.name] = record
        self.summaries[phase.name] = model.summary(self.parts.classifier)
        return record

    def unfreeze(self, phase: Phase) -> None:
        """What the phase trains: from scratch every layer; fine-tuning the base from
        FINE_TUNE_FROM up (a hub module whole); feature extraction leaves the base frozen."""
        if phase.from_scratch:
            model.make_trainable_from_scratch(self.parts.base)
        elif phase.fine_tunes and self.config.is_hub_backbone:
            self.parts.base.trainable = True  # a hub module is fine-tuned whole
        elif phase.fine_tunes:
            model.unfreeze_from(self.parts.base, self.config.fine_tune_from)

    def metrics(self) -> dict:
        """metrics.json's account of the training: the class weights, the cache plan, each
        phase's record, the final phase's scores and the parameters after each phase."""
        final = self.records.get("phase2") or self.records["phase1"]
        return {
            "class_weights": self.class_weights,
            "cache": self.features.plan.as_dict(),
            "phase1": self.records["phase1"],
            "phase2": self.records.get("phase2"),
            "validation": final["validation"],
            "test": final["test"],
            "decision_threshold": final["decision_threshold"],
            "evaluation_warnings": final.get("evaluation_warnings", []),  # none in older records
            "parameters": {name: summary["parameters"] for name, summary in self.summaries.items()},
        }

    def _fit(self, phase: Phase, inputs: PhaseInputs) -> dict:
        """Compiles the phase's model with its optimizer and fits it, resuming its epochs from
        the checkpoint; its record with the scores after it."""
        loss, metrics = model.loss_and_metrics(len(self.dataset.class_names),
                                               self.config.label_smoothing)
        train, validation, steps_per_epoch, examples = self.fit_data(inputs)
        inputs.trained.compile(optimizer=phase.optimizer(steps_per_epoch), loss=loss,
                               metrics=metrics)
        callbacks = self.callbacks(phase) + self.checkpoints.callbacks(phase)
        history = self.checkpoints.history_so_far(phase)
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
        scores = self.scorer.evaluate(phase, inputs)
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
                 "%.4f) in %.1f s", phase, len(probe_data["train"][1]), fitted.c,
                 fitted.validation_accuracy, seconds,
                 extra=edge_logs.fields(phase=str(phase), metrics={
                     "C": fitted.c, "val_accuracy": fitted.validation_accuracy}))
        if fitted.unconverged:
            log.warning("%s: the probe's solver did not converge for C in %s", phase,
                        fitted.unconverged)
        return {
            "epochs_run": 0, "history": {}, "cached": inputs.cached,
            "probe": {"C": fitted.c, "unconverged_C": fitted.unconverged,
                      "validation_accuracy": round(fitted.validation_accuracy, 4)},
            "seconds": round(inputs.cache_seconds + seconds, 2),
            "training_seconds": round(seconds, 2), "cache_seconds": round(inputs.cache_seconds, 2),
            "train_examples": len(probe_data["train"][1]),
            "frozen_layer_inputs": inputs.cached_examples,
            **self.scorer.evaluate(phase, inputs),
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
            EpochLog(str(phase), phase.epochs),
            EpochProgress(str(phase)),
        ]
        if phase.fine_tunes and not phase.from_scratch:  # lowered further when validation stalls
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.2, patience=max(1, self.config.patience - 1),
                min_lr=phase.learning_rate / 100))
        if self.config.tensorboard_uri:
            callbacks.append(keras.callbacks.TensorBoard(
                log_dir=storage.join(self.config.tensorboard_uri, phase.name)))
        return callbacks


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


def _log_cache_plan(cache_plan: budget.CachePlan, config: Config) -> None:
    sizes = ", ".join(f"{name} {diskspace.size_text(size)}"
                      for name, size in cache_plan.phase_bytes.items())
    uncached = ("none: WEIGHTS=none freezes no layer" if config.from_scratch
                else "not cached: CACHE_FEATURES=0")
    log.info("cache: decoded images %s; frozen layers' outputs %s; CACHE_BUDGET %s: %s",
             diskspace.size_text(cache_plan.decoded_images_bytes), sizes or uncached,
             cache_plan.budget, diskspace.size_text(cache_plan.available_bytes))
    for refusal in cache_plan.refusals():
        log.warning("cache: %s", refusal)
