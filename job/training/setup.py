"""Setup: what a run needs before it trains, each failure named by the setting at fault.

The places the job writes checked and claimed, WEIGHTS had and FINE_TUNE_FROM a layer of the base
(`validate`, before any data is read); Keras' dtype policy and seed (`set_up_keras`); this
process's data set, pulled into the cache when remote (`load_data`); and the classifier, a new
head on the frozen conv base (`build_classifier`).
"""
from __future__ import annotations

import logging

import keras
import tensorflow as tf

import storage
from job.cluster.context import RunContext
from job.config import Config, ConfigError
from job.inputs import data
from job.inputs.shard import EVERYTHING
from job.training import model

log = logging.getLogger("job")


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


def build_classifier(config: Config, classes: int) -> model.Classifier:
    """The classifier of `classes` classes: a new head on the conv base, which stays frozen until
    a phase unfreezes it (job/training/phases.py)."""
    base, preprocess_mode = build_base(config)
    return model.build_classifier(base, preprocess_mode, classes, config.image_size,
                                  config.dense_units, config.dropout)


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
