"""Scaling model: the wall time and cost of a default run at 10,000 to 10,000,000 images on 1, 4
and 16 GPU workers, and what bounds it, from per-image costs measured on this machine and stated
figures for a GPU worker and the network.

    python -m bench.scaling [--measured FILE] [--check METRICS.json ...]

A default run is VGG16 at 150 px: the images listed and pulled, decoded once, phase 1 a linear
probe on pooled features (every image once through the whole frozen base), phase 2 ten epochs of
fine-tuning block5 on the cached block4_pool outputs of two augmented views of each training
image (the validation and test images once more through the bottom), with a gradient all-reduce
every step. Each worker does 1/W of the listing's pull, the decoding and the frozen passes
(job/inputs/shard.py); every worker lists the whole prefix and solves the probe on every pooled feature.

The figures of this machine (MEASURED) come from bench/speed.py and bench/storage_pull.py runs
noted below; --measured takes another machine's, as JSON of the same keys. GPU and network
figures (STATED) are not measurable here: each says where it comes from. The model's counts are
checked against real runs with --check: each run's metrics.json (its `workers` records) against
the per-worker work the model assigns for that run's image counts. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# This kind of machine, 2 x86-64 cores (AVX-512), as docs/benchmarks.md reports them:
# bench/speed.py's input pipeline (256 real X-rays, Pillow decode and resize through tf.data) and
# bench/storage_pull.py --latency-ms 20 (2,000 objects from the emulator on loopback, 8 threads,
# 20 ms added to every request as a real bucket's round trip).
MEASURED = {
    "cpu_cores": 2,
    "decode_images_per_s": 609.0,
    "pull_objects_per_s": 178.0,
}
STATED = {
    # NVIDIA T4 datasheet: 65 TFLOPS FP16 (tensor cores); 30 % of it is what convolution
    # networks of this size usually sustain in Keras, an assumption to replace with a measurement.
    "gpu": "NVIDIA T4", "gpu_peak_tflops": 65.0, "gpu_utilisation": 0.30,
    # Compute Engine n1-standard-8 + one T4 (8 vCPUs = 4 cores), list price us-central1, on demand.
    "worker_vcpus": 8, "worker_usd_per_hour": 0.73,
    # Compute Engine: n1-standard-8's egress cap is 16 Gbit/s; all-reduce and pulls share it.
    "worker_gbps": 16.0,
    # Cloud Storage lists 1,000 objects a page; 0.1 s a page is an assumption, and a worker lists
    # the whole prefix (the deal needs whole folders). Default bandwidth quota: 200 Gbit/s per
    # project and region.
    "list_seconds_per_page": 0.1, "bucket_gbps": 200.0,
    # The average object: a JPEG photo resized for training.
    "object_bytes": 150_000,
    # Scratch disk a worker caches to: local SSD (Compute Engine: about 1 GB/s read per device).
    "cache_read_gb_per_s": 1.0,
}
SIZES = (10_000, 1_000_000, 10_000_000)
WORKERS = (1, 4, 16)
SPLITS = {"train": 0.7, "validation": 0.2, "test": 0.1}  # VALIDATION_SPLIT 0.2, TEST_SPLIT 0.1
VIEWS, EPOCHS, BATCH = 2, 10, 32  # AUGMENT_VIEWS, FINE_TUNE_EPOCHS, BATCH_SIZE per replica


def vgg16_figures(image_size: int = 150) -> dict:
    """FLOPs per image of the frozen base and its bottom, of block5's training step per example,
    the bytes of one cached block4_pool output and the parameters phase 2 all-reduces."""
    import keras

    base = keras.applications.VGG16(weights=None, include_top=False,
                                    input_shape=(image_size, image_size, 3))
    macs = {layer.name: math.prod(layer.kernel.shape) * math.prod(layer.output.shape[1:3])
            for layer in base.layers if isinstance(layer, keras.layers.Conv2D)}
    top = sum(m for name, m in macs.items() if name.startswith("block5"))
    pooled = base.get_layer("block4_pool").output.shape[1:]
    trained = sum(math.prod(w.shape) for layer in base.layers if layer.name.startswith("block5")
                  for w in layer.weights) + 512 + 1  # block5 and the linear head
    return {"base_flops": 2 * sum(macs.values()), "bottom_flops": 2 * (sum(macs.values()) - top),
            "top_train_flops": 3 * 2 * top,  # forward, and backward at about twice the forward
            "cached_bytes": 4 * math.prod(pooled), "trained_parameters": trained}


def work(images: int, workers: int) -> dict:
    """What each worker does for a run of that many images: objects pulled, images decoded,
    inputs through the whole frozen base (phase 1) and its bottom (phase 2), phase 2 steps."""
    train, validation, test = (images * SPLITS[name] for name in SPLITS)
    return {"objects": images / workers, "decoded": images / workers,
            "phase1_frozen_layer_inputs": images / workers,
            "phase2_frozen_layer_inputs": (VIEWS * train + validation + test) / workers,
            "phase2_steps_per_epoch": math.ceil(VIEWS * train / (BATCH * workers))}


def predict(images: int, workers: int, vgg: dict, measured: dict, stated: dict) -> dict:
    """Seconds of each step of one run, its wall time, cost and bottleneck."""
    each = work(images, workers)
    gpu_flops = stated["gpu_peak_tflops"] * 1e12 * stated["gpu_utilisation"]
    cores = stated["worker_vcpus"] / 2
    per_core_decode = measured["decode_images_per_s"] / measured["cpu_cores"]
    pull_rate = min(measured["pull_objects_per_s"],
                    stated["worker_gbps"] * 1e9 / 8 / stated["object_bytes"],
                    stated["bucket_gbps"] * 1e9 / 8 / stated["object_bytes"] / workers)
    allreduce = 0 if workers == 1 else (2 * (workers - 1) / workers * 4 * vgg["trained_parameters"]
                                        / (stated["worker_gbps"] * 1e9 / 8))
    step_compute = BATCH * vgg["top_train_flops"] / gpu_flops
    step_read = BATCH * vgg["cached_bytes"] / (stated["cache_read_gb_per_s"] * 1e9)
    seconds = {
        "list": images / 1000 * stated["list_seconds_per_page"],
        "pull": each["objects"] / pull_rate,
        "decode": each["decoded"] / (per_core_decode * cores),
        "frozen_layers": (each["phase1_frozen_layer_inputs"] * vgg["base_flops"]
                          + each["phase2_frozen_layer_inputs"] * vgg["bottom_flops"]) / gpu_flops,
        "phase2_compute": EPOCHS * each["phase2_steps_per_epoch"] * max(step_compute, step_read),
        "phase2_allreduce": EPOCHS * each["phase2_steps_per_epoch"] * allreduce,
    }
    wall = sum(seconds.values())
    cache_gb = each["phase2_frozen_layer_inputs"] * vgg["cached_bytes"] / 1e9
    probe_gb = images * SPLITS["train"] * 512 * 4 / 1e9  # every pooled feature, on every worker
    return {"images": images, "workers": workers, "wall_hours": round(wall / 3600, 2),
            "cost_usd": round(wall / 3600 * workers * stated["worker_usd_per_hour"], 2),
            "bottleneck": max(seconds, key=seconds.get),
            "seconds": {key: round(value) for key, value in seconds.items()},
            "cache_disk_gb_per_worker": round(cache_gb, 1), "probe_memory_gb": round(probe_gb, 1),
            "phase2_step_ms": {"compute": round(1000 * max(step_compute, step_read), 1),
                               "allreduce": round(1000 * allreduce, 1)}}


def check(metrics_path: Path) -> dict:
    """A run's per-worker records against the work the model gives each worker for its counts."""
    metrics = json.loads(Path(metrics_path).read_text())
    workers = metrics["workers"]
    counts = {name: sum(metrics["class_counts"][name].values()) for name in SPLITS}
    images = sum(counts.values())
    expected = images / len(workers)
    phase1 = [worker["phase1_frozen_layer_inputs"] for worker in workers]
    return {"run": str(metrics_path), "workers": len(workers), "images": images,
            "predicted_objects_per_worker": round(expected, 1),
            "measured_objects_per_worker": [w["objects_pulled"] + w["objects_already_cached"]
                                            for w in workers],
            "predicted_phase1_frozen_layer_inputs": round(expected, 1),
            "measured_phase1_frozen_layer_inputs": phase1,
            "largest_deviation": round(max(abs(value - expected) for value in phase1) / expected, 4),
            "seconds_per_phase": [{key: value for key, value in worker.items()
                                   if key.endswith("seconds")} for worker in workers]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, help="JSON of this machine's figures (MEASURED)")
    parser.add_argument("--check", type=Path, nargs="*", default=[], help="runs' metrics.json")
    args = parser.parse_args(argv)
    measured = {**MEASURED, **(json.loads(args.measured.read_text()) if args.measured else {})}
    vgg = vgg16_figures()
    table = [predict(images, workers, vgg, measured, STATED)
             for images in SIZES for workers in WORKERS]
    print(json.dumps({"measured": measured, "stated": STATED, "vgg16_150": vgg, "table": table,
                      "checks": [check(path) for path in args.check]}, indent=1))


if __name__ == "__main__":
    main()
