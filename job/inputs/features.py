"""Features: what each training phase fits and is scored on, as tf.data batches.

With CACHE_FEATURES on (the default) a phase trains only the part of the classifier above its
frozen layers, on their outputs computed once and cached in the scratch directory: phase 2
(fine-tuning) on the outputs of the layers below FINE_TUNE_FROM, phase 1 on pooled features,
computed from those same outputs when phase 2 will use them. The frozen layers run in inference
mode (BatchNormalization too), so running them once gives exactly what every epoch would compute.
With AUGMENT on, each training image enters as AUGMENT_VIEWS random views (seeded by SEED); with
TTA on, the flipped validation and test images are cached too.

With CACHE_FEATURES off, and for a hub backbone's fine-tuning (a hub module cannot be cut at a
layer), the whole classifier trains on the images, the frozen layers running every epoch behind
augmentation drawn afresh each epoch when AUGMENT is on.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from job.config import Config
from job.inputs import budget, data
from job.results.scoring import SCORED_SPLITS
from job.training import model
from storage import diskspace

# tf.data runs each function of a pipeline on one thread unless told otherwise; the augmentation
# in front of the frozen layers gets every core (0: TensorFlow's default intra-op pool), as the
# frozen layers do on the main thread, or on 2 cores the single-threaded augmentation starves them.
_AUGMENTATION_IN_PIPELINE = tf.data.Options()
_AUGMENTATION_IN_PIPELINE.threading.max_intra_op_parallelism = 0
# The cache name of the unaugmented training images' outputs, which a head solved as a linear
# probe fits on (the augmented views keep "train", for fine-tuning).
UNAUGMENTED_TRAIN = "train_unaugmented"
PROBE_SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class PhaseInputs:
    """One phase's inputs: the model that fits (behind augmentation layers when the images are
    augmented online), the model that is scored, and the batches of both."""

    trained: keras.Model
    scored: keras.Model
    train: tf.data.Dataset
    validation: tf.data.Dataset
    train_examples: int
    scored_batches: Callable[[str, bool], tf.data.Dataset]  # (split name, flipped) -> batches
    cached: bool
    cache_seconds: float = 0.0  # the frozen layers' run over every input
    cached_examples: int = 0


class Features:
    """The batches of one data set for one classifier, cached on disk under scratch_dir."""

    def __init__(self, config: Config, dataset: data.DataSet, parts: model.Classifier,
                 scratch_dir: Path, batch_size: int, available_bytes: int,
                 largest: Callable[[int], int] = lambda size: size):
        """largest: a size as the largest any worker of the cluster estimates it for its shard,
        so that all of them decide alike which phases to cache."""
        self.config, self.dataset, self.parts = config, dataset, parts
        self.scratch_dir, self.batch_size = scratch_dir, batch_size
        self._traces: dict[tuple, Callable] = {}  # per extractor (by id) and dtype, see _traced
        decoded = largest(self._decoded_images_bytes())
        held = budget.held_bytes(scratch_dir)  # a resumed run's caches
        # Sizing the frozen layers' outputs builds their inputs, which decodes the images.
        diskspace.require(scratch_dir, max(0, decoded - held), "the decoded images")
        self.plan = budget.plan(config.cache_budget.describe(), available_bytes, decoded,
                                {phase: largest(size)
                                 for phase, size in self._wanted_cache_bytes().items()})
        diskspace.require(scratch_dir, self._bytes_to_write(), "the frozen layers' outputs")

    def for_phase(self, fine_tunes: bool, augmentation_seed: int) -> PhaseInputs:
        """The inputs of the head phase (fine_tunes False) or the fine-tuning phase. Call it after
        the base is unfrozen for fine-tuning: the part that trains is cut from it then."""
        if fine_tunes and self.fine_tunes_cached:
            return self._cached(self.fine_tuning_parts[2], head=False)
        if not fine_tunes and self.plan.cached.get("phase1"):
            return self._cached(self.parts.head, head=True)
        return self._online(augmentation_seed)

    def for_scoring(self) -> PhaseInputs:
        """Inputs that score the whole classifier on the decoded images, with no frozen layers'
        outputs computed: how a phase that an earlier attempt finished is scored again."""
        return self._online(self.config.seed)

    @property
    def fine_tunes_cached(self) -> bool:
        return self.plan.cached.get("phase2", False)

    def _wanted_cache_bytes(self) -> dict[str, int]:
        """Per phase that would train on cached outputs of its frozen layers, their size: the
        pooled features for phase 1; for phase 2 the frozen bottom's outputs and the pooled
        features phase 1 then computes from them."""
        config = self.config
        if not config.cache_features or config.from_scratch:  # nothing is frozen
            return {}
        features = self._outputs_bytes(self.parts.feature_extractor, head=True)
        if config.is_hub_backbone or config.fine_tune_epochs == 0:
            return {"phase1": features}
        return {"phase1": features,
                "phase2": features + self._outputs_bytes(self.fine_tuning_parts[0], head=False)}

    def _bytes_to_write(self) -> int:
        """What the caches the plan keeps will add to the scratch directory: the decoded images
        and the largest cached phase's outputs (phase 2's include phase 1's), less what a
        resumed run's scratch already holds."""
        plan = self.plan
        outputs = max((plan.phase_bytes[phase] for phase, cached in plan.cached.items() if cached),
                      default=0)
        return max(0, plan.decoded_images_bytes + outputs - budget.held_bytes(self.scratch_dir))

    def _outputs_bytes(self, extractor: keras.Model, head: bool) -> int:
        counts = {name: count for name, (_, count) in self.frozen_inputs(head).items()}
        return budget.tensor_bytes(extractor.output.shape[1:], extractor.output.dtype,
                                   sum(counts.values()))

    def _decoded_images_bytes(self) -> int:
        size = self.config.image_size
        return budget.tensor_bytes((size, size, 3), "uint8",
                                   sum(len(getattr(self.dataset, name)) for name in data.SPLITS))

    @functools.cached_property
    def fine_tuning_parts(self) -> tuple[keras.Model, keras.Model, keras.Model]:
        """(frozen bottom, upper features, trainable top), cut at FINE_TUNE_FROM."""
        return model.split_for_fine_tuning(self.parts, self.config.fine_tune_from)

    def images(self, split_name: str, training: bool = False,
               flipped: bool = False) -> tf.data.Dataset:
        """Batches of (image, label) of a split, decoded once and cached on disk."""
        split = getattr(self.dataset, split_name)
        images = data.image_dataset(split, self.config.image_size, self.batch_size,
                                    shuffle=training, seed=self.config.seed,
                                    cache_file=str(self.scratch_dir / split_name))
        return images.map(lambda x, y: (ops.flip(x, axis=2), y)) if flipped else images

    def _online(self, augmentation_seed: int) -> PhaseInputs:
        classifier = self.parts.classifier
        trained = classifier
        if self.config.augment:
            trained = model.with_augmentation(classifier,
                                              model.build_augmentation(augmentation_seed))
        return PhaseInputs(trained, classifier, self.images("train", training=True),
                           self.images("validation"), len(self.dataset.train),
                           lambda name, flipped: self.images(name, flipped=flipped), cached=False)

    def _cached(self, trained: keras.Model, head: bool) -> PhaseInputs:
        started = time.perf_counter()
        outputs = self.frozen_outputs(head)
        seconds = time.perf_counter() - started
        return PhaseInputs(
            trained, trained, self.batches(outputs["train"], training=True),
            self.batches(outputs["validation"]), int(outputs["train"].cardinality()),
            lambda name, flipped: self.batches(outputs[f"{name}_flipped" if flipped else name]),
            cached=True, cache_seconds=seconds,
            cached_examples=sum(int(examples.cardinality()) for examples in outputs.values()))

    def frozen_outputs(self, head: bool) -> dict[str, tf.data.Dataset]:
        """(frozen layers' output, label) per example of each input: pooled features for the
        head, the outputs below FINE_TUNE_FROM for fine-tuning (and under them the head's, when
        fine-tuning is cached too). The unaugmented training images a linear probe fits on run
        through the whole frozen base at once: fine-tuning trains on augmented views, so their
        bottom outputs would be cached for nothing."""
        inputs = self.frozen_inputs(head)
        if not self.fine_tunes_cached:
            outputs = self._run_once(self.parts.feature_extractor, inputs, "features")
        else:
            bottom, upper, _ = self.fine_tuning_parts
            unaugmented = {UNAUGMENTED_TRAIN: inputs.pop(UNAUGMENTED_TRAIN)} \
                if UNAUGMENTED_TRAIN in inputs else {}
            outputs = self._run_once(bottom, inputs, "bottom")
            if not head:
                return outputs
            outputs = self._run_once(upper, {name: (examples.batch(self.batch_size),
                                                    int(examples.cardinality()))
                                             for name, examples in outputs.items()}, "features")
            outputs.update(self._run_once(self.parts.feature_extractor, unaugmented, "features"))
        if UNAUGMENTED_TRAIN in outputs:  # the probe's training split: under its own cache name
            outputs["train"] = outputs.pop(UNAUGMENTED_TRAIN)
        return outputs

    def frozen_inputs(self, head: bool = False) -> dict[str, tuple[tf.data.Dataset, int]]:
        """(image batches, image count) per input the frozen layers run on once (see
        frozen_input_counts)."""
        return {name: (self._frozen_input(name), count)
                for name, count in self.frozen_input_counts(head).items()}

    def frozen_input_counts(self, head: bool = False) -> dict[str, int]:
        """Image count per input the frozen layers run on once: the training images (as
        AUGMENT_VIEWS augmented views each with AUGMENT on, except for a head solved as a linear
        probe, which fits on the images as they are: UNAUGMENTED_TRAIN), the validation and test
        images (and their horizontal flips, "<split>_flipped", with TTA on)."""
        config, train = self.config, len(self.dataset.train)
        if not config.augment:
            counts = {"train": train}
        elif head and config.solves_probe:
            counts = {UNAUGMENTED_TRAIN: train}
        else:
            counts = {"train": config.augment_views * train}
        for name in SCORED_SPLITS:
            count = len(getattr(self.dataset, name))
            if count:
                counts[name] = count
                if config.tta:
                    counts[f"{name}_flipped"] = count
        return counts

    def _frozen_input(self, name: str) -> tf.data.Dataset:
        if name == "train" and self.config.augment:
            views = model.build_augmentation(self.config.seed)
            return self.images("train").repeat(self.config.augment_views).map(
                lambda x, y: (views(x, training=True), y))
        split = name.split("_")[0]  # train_unaugmented, test_flipped: the images of a split
        return self.images(split, flipped=name.endswith("_flipped"))

    def probe_data(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(pooled features, labels) of the training images, unaugmented, and of the validation
        images: what phase 1 fits the linear probe on and chooses its C by. From the head's
        cache where features are cached, else from one pass of the frozen base, cached too."""
        if self.plan.cached.get("phase1"):
            outputs = self.frozen_outputs(head=True)
        else:
            outputs = self._run_once(self.parts.feature_extractor,
                                     {name: (self.images(name), len(getattr(self.dataset, name)))
                                      for name in PROBE_SPLITS}, "probe")
        return {name: _arrays(outputs[name]) for name in PROBE_SPLITS}

    def pooled_features(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """probe_data, and the test split's pooled features where the head's cache holds them
        (CACHE_FEATURES on): what the data audit uses, with no further pass of the frozen base."""
        pooled = self.probe_data()
        if self.plan.cached.get("phase1") and len(self.dataset.test):
            pooled["test"] = _arrays(self.frozen_outputs(head=True)["test"])
        return pooled

    def _run_once(self, extractor: keras.Model, inputs: dict[str, tuple[tf.data.Dataset, int]],
                  tag: str) -> dict[str, tf.data.Dataset]:
        """(output, label) per example of each input, from a file of the scratch directory that
        one pass of the extractor fills, unless a complete one is there already."""
        spec = tf.TensorSpec(extractor.output.shape[1:], extractor.output.dtype)
        cached = {}
        for name, (batches, count) in inputs.items():
            path = self.scratch_dir / f"{tag}-{name}.tfrecord"
            if not path.exists():
                step = f"frozen layers ({tag}) on {name}"
                with diskspace.writing(path, budget.tensor_bytes(spec.shape, extractor.output.dtype,
                                                                 count), f"the outputs of the {step}"):
                    _fill(path, self._traced(extractor, batches.element_spec[0]), batches,
                          count, step)
            cached[name] = _read(path, spec, batches.element_spec[1].dtype, count)
        return cached

    def _traced(self, extractor: keras.Model, images: tf.TensorSpec) -> Callable:
        """extractor in inference mode as a function traced once per run and input dtype (under
        mixed precision the augmented views are float16, the other images float32), for batches
        of any size: a trace of MobileNetV2 takes most of a second. Traced for any batch size at
        once: traced at the first batch's size, it was traced again at the last, smaller batch
        (and TensorFlow warned of retracing)."""
        key = (id(extractor), images.dtype)
        if key not in self._traces:
            self._traces[key] = tf.function(
                lambda batch: extractor(batch, training=False)).get_concrete_function(
                tf.TensorSpec([None, *images.shape[1:]], images.dtype))
        return self._traces[key]

    def batches(self, examples: tf.data.Dataset, training: bool = False) -> tf.data.Dataset:
        if training:
            examples = examples.shuffle(data.shuffle_buffer(examples), seed=self.config.seed,
                                        reshuffle_each_iteration=True)
        return examples.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)


def _arrays(examples: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a data set of examples, as two arrays."""
    batches = list(examples.batch(4096).as_numpy_iterator())
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


# The frozen layers run on the main thread, fed by tf.data, and their outputs are written batch by
# batch to a file (data.write_records), rather than run inside a tf.data map in front of a cache:
# the same traced call runs 1.6x as fast outside the pipeline (78 to 88 images/s against 48 to 53
# inside its map, MobileNetV2 0.5 at 224, 2 AVX2 cores), as fast as the SavedModel serves (the
# whole pass, augmentation included, is in README's Benchmarks).

def _fill(path: Path, run: Callable, batches: tf.data.Dataset, count: int, step: str) -> None:
    """Writes run's output and the labels of every batch to path, logging progress as step."""
    batches = batches.with_options(_AUGMENTATION_IN_PIPELINE).prefetch(tf.data.AUTOTUNE)
    data.write_records(path, ((run(images), labels) for images, labels in batches), count, step)


def _read(path: Path, spec: tf.TensorSpec, label_dtype: tf.DType, count: int) -> tf.data.Dataset:
    """(output, label) per example of a file _fill wrote."""
    return data.read_records(path, (spec, tf.TensorSpec((), label_dtype)), count)
