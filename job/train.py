"""Train: one run of the job, from a validated Config to a complete run directory.

Phase 1 (feature extraction) trains a new head on a frozen conv base: on features computed once
when AUGMENT is off, or through the frozen base behind augmentation layers when it is on.
Phase 2 (fine-tuning) unfreezes the base from FINE_TUNE_FROM up and trains at a low learning
rate. The run directory gets the SavedModel, labels, metrics, plots and summary, then MANIFEST.json.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from job import data, model, report, storage
from job.config import Config, ConfigError

log = logging.getLogger("job")


class SetupError(Exception):
    """The run cannot start in this environment (e.g. weights that cannot be fetched)."""


def validate(config: Config) -> None:
    """Checks what the environment alone cannot: that FINE_TUNE_FROM names a layer of the base."""
    if config.is_hub_backbone or config.fine_tune_epochs == 0:
        return
    names = model.base_layer_names(config.backbone, config.alpha, config.image_size)
    if config.fine_tune_from not in names:
        conv_names = [n for n in names if "conv" in n or "expand" in n][-6:]
        raise ConfigError(f"FINE_TUNE_FROM={config.fine_tune_from!r} names no layer of "
                          f"{config.backbone}; top layers include {', '.join(conv_names)}")


def run(config: Config) -> dict:
    """Trains, evaluates and writes one run; returns its metrics (or the finished run's status)."""
    manifest_uri = storage.join(config.run_uri, report.MANIFEST)
    if storage.exists(manifest_uri):
        log.info("run %s is already complete at %s; nothing to do", config.run_id, config.run_uri)
        return {"status": "already complete", "run_uri": config.run_uri}

    precision = choose_precision(config.mixed_precision)
    keras.mixed_precision.set_dtype_policy(precision)
    keras.utils.set_random_seed(config.seed)
    log.info("precision policy: %s (MIXED_PRECISION=%s, GPUs: %d)", precision,
             config.mixed_precision, len(tf.config.list_physical_devices("GPU")))

    data_root = storage.fetch_tree(config.data_uri, config.cache_dir / "data")
    dataset = data.load_dataset(data_root, config.image_size, config.validation_split,
                                config.test_split, config.seed)
    for note in dataset.notes:
        log.info("data: %s", note)
    for path, reason in dataset.skipped.items():
        log.warning("skipped %s: %s", path, reason)
    log.info("classes %s; images per split %s; skipped %d", dataset.class_names,
             {name: len(getattr(dataset, name)) for name in data.SPLITS}, len(dataset.skipped))

    base, preprocess_mode = build_base(config)
    parts = model.build_classifier(base, preprocess_mode, len(dataset.class_names),
                                   config.image_size, config.dense_units, config.dropout)
    work_dir = storage.local_dir_for(config.run_uri, config.cache_dir / "runs" / config.run_id)
    work_dir.mkdir(parents=True, exist_ok=True)
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="decoded-", dir=config.cache_dir) as scratch_dir:
        trainer = Trainer(config, dataset, parts, Path(scratch_dir))
        phase1 = trainer.train_head()
        summaries = {"phase1": _summary(parts.classifier)}
        phase2 = trainer.fine_tune() if config.fine_tune_epochs > 0 else None
        if phase2:
            summaries["phase2"] = _summary(parts.classifier)
        evaluation = trainer.evaluate()

    metrics = {
        "run_id": config.run_id,
        "config": _config_record(config),
        "precision_policy": precision,
        "versions": _versions(),
        "hardware": _hardware(),
        "classes": dataset.class_names,
        "class_counts": dataset.counts(),
        "data_notes": dataset.notes,
        "skipped_files": dataset.skipped,
        "class_weights": trainer.class_weights,
        "phase1": phase1,
        "phase2": phase2,
        **evaluation,
        "parameters": {phase: s["parameters"] for phase, s in summaries.items()},
    }
    write_run(work_dir, config, parts.classifier, dataset.class_names, metrics, summaries)
    storage.publish_tree(work_dir, config.run_uri, last=report.MANIFEST)
    if config.model_uri != storage.join(config.run_uri, "saved_model"):
        storage.publish_tree(work_dir / "saved_model", config.model_uri)
    log.info("run complete: %s", config.run_uri)
    if config.export_onnx:  # ONNX float32/int8 beside the SavedModel, gated (see export/)
        from export.pipeline import export_after_training
        export_after_training(config)
    return metrics


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
    weights = {"none": None, "imagenet": "imagenet"}.get(config.weights)
    if config.weights not in ("none", "imagenet"):
        weights = str(storage.fetch_file(config.weights, config.cache_dir / "weights"))
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


class Trainer:
    """The two phases over one data set and one classifier."""

    def __init__(self, config: Config, dataset: data.DataSet, parts: model.Classifier,
                 scratch_dir: Path):
        self.config = config
        self.dataset = dataset
        self.parts = parts
        self.scratch_dir = scratch_dir
        self.num_classes = len(dataset.class_names)
        self.class_weights = (data.class_weights(dataset.train, self.num_classes)
                              if config.class_weights == "auto" and _imbalanced(dataset.train)
                              else None)
        self.verbose = 1 if sys.stdout.isatty() else 0

    def images(self, split_name: str, training: bool = False) -> tf.data.Dataset:
        split = getattr(self.dataset, split_name)
        return data.image_dataset(split, self.config.image_size, self.config.batch_size,
                                  shuffle=training, seed=self.config.seed,
                                  cache_file=str(self.scratch_dir / split_name))

    def labels(self, split_name: str) -> np.ndarray:
        return np.asarray(getattr(self.dataset, split_name).labels, dtype=np.int32)

    def train_head(self) -> dict:
        """Phase 1: the base frozen, only the new head learns."""
        config = self.config
        loss, metrics = model.loss_and_metrics(self.num_classes)
        optimizer = keras.optimizers.Adam(config.head_learning_rate)
        started = time.perf_counter()
        extraction_seconds = 0.0
        if config.augment:
            trainer = model.with_augmentation(self.parts.classifier, model.build_augmentation(config.seed))
            trainer.compile(optimizer=optimizer, loss=loss, metrics=metrics)
            history = trainer.fit(self.images("train", training=True),
                                  validation_data=self.images("validation"),
                                  epochs=config.head_epochs, class_weight=self.class_weights,
                                  callbacks=self.callbacks("phase 1", config.head_epochs),
                                  verbose=self.verbose)
        else:
            features = {name: self.parts.feature_extractor.predict(self.images(name), verbose=0)
                        for name in ("train", "validation")}
            extraction_seconds = time.perf_counter() - started
            log.info("phase 1: features of %d images computed once in %.1f s",
                     len(features["train"]) + len(features["validation"]), extraction_seconds)
            self.parts.head.compile(optimizer=optimizer, loss=loss, metrics=metrics)
            history = self.parts.head.fit(
                features["train"], self.labels("train"), batch_size=config.batch_size,
                validation_data=(features["validation"], self.labels("validation")),
                epochs=config.head_epochs, class_weight=self.class_weights, shuffle=True,
                callbacks=self.callbacks("phase 1", config.head_epochs), verbose=self.verbose)
        return self._phase_record(history, started, extraction_seconds,
                                  cached_features=not config.augment)

    def fine_tune(self) -> dict:
        """Phase 2: the top of the base unfrozen, at a low learning rate."""
        config = self.config
        if config.is_hub_backbone:
            self.parts.base.trainable = True
        else:
            model.unfreeze_from(self.parts.base, config.fine_tune_from)
        loss, metrics = model.loss_and_metrics(self.num_classes)
        trainer = self.parts.classifier
        if config.augment:
            trainer = model.with_augmentation(trainer, model.build_augmentation(config.seed + 1))
        trainer.compile(optimizer=keras.optimizers.RMSprop(config.fine_tune_learning_rate),
                        loss=loss, metrics=metrics)
        started = time.perf_counter()
        reduce_lr = keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.2, patience=max(1, config.patience - 1),
            min_lr=config.fine_tune_learning_rate / 100)
        history = trainer.fit(self.images("train", training=True),
                              validation_data=self.images("validation"),
                              epochs=config.fine_tune_epochs, class_weight=self.class_weights,
                              callbacks=[*self.callbacks("phase 2", config.fine_tune_epochs), reduce_lr],
                              verbose=self.verbose)
        return self._phase_record(history, started, 0.0, cached_features=False)

    def callbacks(self, phase: str, epochs: int) -> list[keras.callbacks.Callback]:
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.config.patience,
                                          restore_best_weights=True),
            EpochLog(phase, epochs),
        ]
        if self.config.tensorboard_uri:
            callbacks.append(keras.callbacks.TensorBoard(
                log_dir=storage.join(self.config.tensorboard_uri, phase.replace(" ", ""))))
        return callbacks

    def evaluate(self) -> dict:
        """Validation and test metrics of the final classifier."""
        result = {}
        for name in ("validation", "test"):
            if len(getattr(self.dataset, name)) == 0:
                result[name] = None
                continue
            probabilities = self.parts.classifier.predict(self.images(name), verbose=0)
            result[name] = report.classification_metrics(
                self.labels(name), probabilities, self.dataset.class_names)
            log.info("%s: accuracy %.4f, loss %.4f%s", name, result[name]["accuracy"],
                     result[name]["loss"],
                     f", ROC AUC {result[name]['roc_auc']:.4f}" if result[name].get("roc_auc") else "")
        return result

    def _phase_record(self, history, started: float, extraction_seconds: float,
                      cached_features: bool) -> dict:
        seconds = time.perf_counter() - started
        epochs = len(history.history.get("loss", []))
        trained = epochs * len(self.dataset.train)
        return {
            "epochs_run": epochs,
            "history": {key: [float(v) for v in values] for key, values in history.history.items()},
            "cached_features": cached_features,
            "seconds": round(seconds, 2),
            "feature_extraction_seconds": round(extraction_seconds, 2),
            "images_per_second": round(trained / max(seconds - extraction_seconds, 1e-9), 1),
        }


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch with its metrics."""

    def __init__(self, phase: str, epochs: int):
        super().__init__()
        self.phase, self.epochs = phase, epochs

    def on_epoch_end(self, epoch, logs=None):
        values = " ".join(f"{key}={float(value):.4f}" for key, value in (logs or {}).items())
        log.info("%s epoch %d/%d: %s", self.phase, epoch + 1, self.epochs, values)


def write_run(work_dir: Path, config: Config, classifier: keras.Model, class_names: list[str],
              metrics: dict, summaries: dict) -> None:
    """Writes every output file; MANIFEST.json, last, marks the run complete."""
    classifier.export(str(work_dir / "saved_model"), verbose=False)
    classifier.save(work_dir / "model.keras")
    (work_dir / "labels.txt").write_text("\n".join(class_names) + "\n")
    for phase in ("phase1", "phase2"):
        if metrics.get(phase):
            report.plot_history(metrics[phase]["history"], phase.replace("phase", "phase "),
                                work_dir / f"curves_{phase}.png")
    (work_dir / "model_summary.txt").write_text("\n\n".join(
        f"== after {phase} ==\n{s['text']}\n{s['parameters']}" for phase, s in summaries.items()))
    report.write_json(work_dir / "metrics.json", metrics)
    report.write_manifest(work_dir)


def _summary(classifier: keras.Model) -> dict:
    lines: list[str] = []
    classifier.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=100)
    return {"text": "\n".join(lines), "parameters": model.parameter_counts(classifier)}


def _imbalanced(split: data.Split, ratio: float = 1.5) -> bool:
    counts = np.bincount(np.asarray(split.labels))
    return counts.max() > ratio * counts.min()


def _config_record(config: Config) -> dict:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(config).items()}


def _versions() -> dict:
    import sklearn

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def _hardware() -> dict:
    import psutil

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpus": [gpu.name for gpu in tf.config.list_physical_devices("GPU")]}
