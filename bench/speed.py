"""Training speed on this machine: input pipeline, cached against uncached phases, step throughput.

Every comparison is a ratio of two figures measured in this one run (medians of --repeats), on
real chest X-rays from ../shared (or the class folders --data names). Prints one JSON object.
MobileNetV2 runs with the real ImageNet weights from ../shared, VGG16 with random ones (speed does
not depend on the weights).

    python -m bench.speed [--backbone mobilenet_v2] [--images 256] [--repeats 3]
        [--only pipeline,phase1,phase2,steps] [--precisions float32,mixed_float16,mixed_bfloat16]
        [--data DIR] [--image-size N]

- pipeline: decoded and resized images/s from local disk (no cache), against the model's own
  training images/s in phase 2 (the pipeline should be at least 2x faster, never the bottleneck).
- phase1: seconds per head epoch on cached features against running the frozen base every epoch.
- phase2: seconds per fine-tuning epoch on cached activations of the frozen bottom against
  running the whole model every epoch.
- extraction: images/s of the job's own frozen feature extraction (job.inputs.features: the passes that
  cache the frozen layers' outputs, phase 1's on the unaugmented training images and validation,
  phase 2's on the augmented training views) against the exported SavedModel's batch-32
  inference rate, measured in the same run (goal: 0.8x or more).
- steps: training images/s of phase 1 with augmentation and of phase 2, float32 against mixed
  precision (float16 and bfloat16), with and without XLA (jit_compile).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from job.config import Config, default_fine_tune_from, default_image_size  # noqa: E402
from job.inputs import data
from job.inputs.features import Features  # noqa: E402
from job.training import model

SHARED = REPO.parent / "shared"
XRAY_TRAIN = SHARED / "data" / "chest_xray_pneumonia_224" / "train"
WEIGHTS = {"mobilenet_v2": SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"}
BATCH_SIZE = 32
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def real_images(root: Path, count: int) -> data.Split:
    """The first count / classes images of each class folder under root."""
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir())
    per_class = count // len(class_dirs)
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        chosen = sorted(class_dir.iterdir())[:per_class]
        paths += [str(p) for p in chosen]
        labels += [label] * len(chosen)
    return data.Split(paths, labels)


def build(backbone: str, image_size: int, policy: str = "float32") -> model.Classifier:
    keras.mixed_precision.set_dtype_policy(policy)
    weights = WEIGHTS.get(backbone)
    base, mode = model.build_base(backbone, 0.5, str(weights) if weights else None, image_size)
    return model.build_classifier(base, mode, 2, image_size, dense_units=256, dropout=0.5)


def epoch_seconds(trainer: keras.Model, batches: tf.data.Dataset, repeats: int,
                  jit_compile=False) -> float:
    trainer.compile(optimizer=keras.optimizers.RMSprop(1e-5), loss="binary_crossentropy",
                    jit_compile=jit_compile)
    trainer.fit(batches.take(2), epochs=1, verbose=0)  # trace and warm up
    return median_seconds(lambda: trainer.fit(batches, epochs=1, verbose=0), repeats)


def labelled(split: data.Split, outputs: np.ndarray) -> tf.data.Dataset:
    labels = np.asarray(split.labels, dtype=np.float32)
    return tf.data.Dataset.from_tensor_slices((outputs, labels)).batch(BATCH_SIZE)


def whole_model_epoch_seconds(split, size, parts, backbone, repeats) -> float:
    """Seconds per phase-2 epoch that runs the whole model (the frozen bottom too) on decoded
    images held in memory: the figure pipeline and phase2 both compare against, measured once."""
    model.unfreeze_from(parts.base, default_fine_tune_from(backbone))
    images = data.image_dataset(split, size, BATCH_SIZE).cache()
    seconds = epoch_seconds(parts.classifier, images, repeats)
    parts.base.trainable = False
    return seconds


def bench_pipeline(split, size, train: float, repeats) -> dict:
    """train: whole_model_epoch_seconds."""
    pipeline = data.image_dataset(split, size, BATCH_SIZE, shuffle=True)
    decode = median_seconds(lambda: sum(1 for _ in pipeline), repeats)
    return {"pipeline_images_per_s": round(len(split) / decode, 1),
            "model_training_images_per_s": round(len(split) / train, 1),
            "ratio": round(train / decode, 2)}


def bench_phase1(split, size, parts, repeats) -> dict:
    images = data.image_dataset(split, size, BATCH_SIZE).cache()
    uncached = epoch_seconds(parts.classifier, images, repeats)
    started = time.perf_counter()
    features = parts.feature_extractor.predict(images, verbose=0)
    extraction = time.perf_counter() - started
    cached = epoch_seconds(parts.head, labelled(split, features), repeats)
    return {"uncached_epoch_s": round(uncached, 3), "cached_epoch_s": round(cached, 4),
            "one_time_feature_extraction_s": round(extraction, 2), "ratio": round(uncached / cached, 1)}


def bench_phase2(split, size, parts, backbone, uncached: float, repeats) -> dict:
    """uncached: whole_model_epoch_seconds."""
    layer = default_fine_tune_from(backbone)
    model.unfreeze_from(parts.base, layer)
    images = data.image_dataset(split, size, BATCH_SIZE).cache()
    bottom, _, top = model.split_for_fine_tuning(parts, layer)
    started = time.perf_counter()
    activations = bottom.predict(images, verbose=0)
    extraction = time.perf_counter() - started
    cached = epoch_seconds(top, labelled(split, activations), repeats)
    parts.base.trainable = False
    return {"fine_tune_from": layer, "uncached_epoch_s": round(uncached, 3),
            "cached_epoch_s": round(cached, 3), "one_time_activation_pass_s": round(extraction, 2),
            "ratio": round(uncached / cached, 2)}


def bench_extraction(split, size, parts, backbone, repeats) -> dict:
    """The job's frozen-layer passes as a default run makes them (decode, augment, frozen layers,
    write their outputs to the scratch cache): for phase 1 the unaugmented training images and
    the validation images, for phase 2 the augmented views of the training images; against
    serving the exported SavedModel on batches of 32 of the same images, decoded beforehand."""
    images = data.image_dataset(split, size, BATCH_SIZE).cache()
    batches = [x for x, _ in images]
    with tempfile.TemporaryDirectory() as scratch:
        parts.classifier.export(f"{scratch}/saved_model", verbose=False)
        serve = tf.saved_model.load(f"{scratch}/saved_model").signatures["serving_default"]
        serve(batches[0])  # trace and warm up
        serving = median_seconds(lambda: [serve(batch) for batch in batches], repeats)
        config = Config(data_uri="(images in memory)", backbone=backbone, image_size=size)
        no_test = dataclasses.replace(split, paths=[], labels=[])
        dataset = data.DataSet(["0", "1"], split, split, no_test, {}, [], Path(scratch))

        def features() -> Features:
            run = Path(tempfile.mkdtemp(dir=scratch))
            return Features(config, dataset, parts, run, BATCH_SIZE, available_bytes=2**62)

        def extract():
            run = features()
            for head in (True, False):  # phase 1, then phase 2 (reusing phase 1's validation)
                run.frozen_outputs(head)

        extract()  # traces the frozen layers
        extraction = median_seconds(extract, repeats)
        counts = {**features().frozen_input_counts(head=True), **features().frozen_input_counts()}
    passes = sum(counts.values())
    return {"augment_views": config.augment_views, "inputs": counts,
            "images_through_frozen_layers": passes,
            "extraction_images_per_s": round(passes / extraction, 1),
            "saved_model_batch32_images_per_s": round(len(split) / serving, 1),
            "ratio": round(passes / extraction / (len(split) / serving), 2)}


def bench_steps(split, size, backbone, repeats, policies) -> list[dict]:
    """images/s of training steps on one real batch, for each precision and XLA setting."""
    batch = next(iter(data.image_dataset(split, size, BATCH_SIZE)))
    rows = []
    for policy in policies:
        for jit in (False, True):
            for phase in ("phase 1, augmented", "phase 2"):
                keras.backend.clear_session()
                parts = build(backbone, size, policy)
                trainer = parts.classifier
                if phase == "phase 2":
                    model.unfreeze_from(parts.base, default_fine_tune_from(backbone))
                else:
                    trainer = model.with_augmentation(trainer, model.build_augmentation(0))
                steps = tf.data.Dataset.from_tensors(batch).repeat(3)
                try:
                    seconds = epoch_seconds(trainer, steps, repeats, jit_compile=jit)
                    rate = round(3 * len(batch[0]) / seconds, 1)  # a split under BATCH_SIZE: fewer
                except Exception as error:  # e.g. an op XLA cannot compile on this device
                    rate = f"failed: {error.__class__.__name__}: {str(error).splitlines()[0][:120]}"
                # Keras compiles without XLA, warning, a model it cannot jit (the augmentation's
                # random layers): the row says so rather than timing plain steps as XLA's.
                rows.append({"phase": phase, "precision": policy, "xla": jit,
                             "xla_applied": bool(trainer.jit_compile), "images_per_s": rate})
    keras.mixed_precision.set_dtype_policy("float32")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2", choices=["mobilenet_v2", "vgg16"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="pipeline,phase1,phase2,extraction,steps")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="dtype policies of steps")
    parser.add_argument("--data", type=Path, default=XRAY_TRAIN, help="a folder of class folders")
    parser.add_argument("--image-size", type=int, default=0, help="default: the backbone's")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"data not found at {args.data}")
    size = args.image_size or default_image_size(args.backbone)
    split = real_images(args.data, args.images)
    wanted = args.only.split(",")
    keras.utils.set_random_seed(0)
    parts = build(args.backbone, size)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "gpus": len(tf.config.list_physical_devices("GPU"))},
              "backbone": args.backbone, "image_size": size, "images": len(split),
              "batch_size": BATCH_SIZE, "repeats": args.repeats, "tensorflow": tf.__version__}
    if {"pipeline", "phase2"} & set(wanted):
        whole_epoch = whole_model_epoch_seconds(split, size, parts, args.backbone, args.repeats)
    if "pipeline" in wanted:
        result["pipeline"] = bench_pipeline(split, size, whole_epoch, args.repeats)
    if "phase1" in wanted:
        result["phase1"] = bench_phase1(split, size, parts, args.repeats)
    if "phase2" in wanted:
        result["phase2"] = bench_phase2(split, size, parts, args.backbone, whole_epoch,
                                        args.repeats)
    if "extraction" in wanted:
        result["extraction"] = bench_extraction(split, size, parts, args.backbone, args.repeats)
    if "steps" in wanted:
        result["steps"] = bench_steps(split, size, args.backbone, args.repeats,
                                      args.precisions.split(","))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
