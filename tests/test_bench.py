"""Smoke tests of the bench/ scripts: each runs end to end on tiny generated images and prints
the JSON it promises, so none can rot unnoticed between the hand runs that fill docs/benchmarks.md.

Tiny means 32x32 (VGG16 with random weights; inference's MobileNetV2 with its real ones), one or
two epochs, a handful of images: the figures mean nothing, the keys and the code paths behind
them are what is checked. memory, whose figures are its job processes' peak RSS, runs as its users
run it (`python -m bench.memory`), started when the module's first test starts; the others run
their main in this process meanwhile, so that TensorFlow starts once for them all. So do the job
and export runs of inference and quality, through run_in_process in place of the fresh process
each script starts per run (what the tests check, the JSON's keys and what the runs report, does
not depend on it; quality's wall seconds then lack TensorFlow's start-up).
test_inference_refuses_a_run_that_is_not_finished starts one process as a user does.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.datasets import link_slice
from tests.conftest import ROOT, random_vgg16_weights, run_in_process, write_class_images

TINY_JOB = ["--set", "IMAGE_SIZE=32", "--set", "HEAD_EPOCHS=1", "--set", "FINE_TUNE_EPOCHS=1",
            "--set", "BATCH_SIZE=8"]
# Started as processes by the module's first test: what they measure is their job processes.
AS_PROCESSES = {"memory"}


def script_arguments(trees: dict[str, Path], work: Path) -> dict[str, list[str]]:
    """Per test name: the script's flags for a tiny run."""
    split, flat = str(trees["split"]), str(trees["flat"])
    return {
        "speed": ["--backbone", "vgg16", "--images", "4", "--repeats", "1", "--image-size", "32",
                  "--data", f"{split}/train", "--precisions", "float32"],
        # MobileNetV2 (its real weights from ../shared): its int8 export takes a fifth of VGG16's,
        # whose 4,608-input convolutions GPTQ rounds (export/int8/rounding.py) in a minute.
        "inference": ["--models", "mobilenet_v2_050_224", "--image-size", "32",
                      "--latency-runs", "2", "--data", split, "--images-per-class", "8,3,2"],
        # Phase 1 alone, one epoch: the script reads only peak RSS, wall time and the counts.
        "memory": ["--backbone", "vgg16", "--weights", random_vgg16_weights(), "--image-size", "32",
                   "--per-class", "2", "--data", split, "--set", "HEAD_EPOCHS=1",
                   "--set", "FINE_TUNE_EPOCHS=0"],
        # Class folders without split folders: the job and the probe each split them, seeded.
        "quality": ["--data", flat, "--subset", "12", "--seeds", "7", "--backbone", "vgg16",
                    "--weights", random_vgg16_weights(), "--ablations", "default",
                    "--work", str(work / "quality"), *TINY_JOB],
        "storage_pull": ["--objects", "20", "--repeats", "1", "--data", split],
        "scaling": ["--check", str(two_worker_metrics(work))],
        "onnx_float32": ["--image-size", "32", "--repeats", "1"],
        "serving_decode": ["--data", split, "--size", "16"],
    }


def two_worker_metrics(root: Path) -> Path:
    """A metrics.json of a run on two workers, as much of it as bench/scaling.py --check reads."""
    worker = {"objects_pulled": 9, "objects_already_cached": 1, "phase1_frozen_layer_inputs": 10,
              "phase1_seconds": 3.0, "phase2_seconds": 4.0}
    metrics = {"class_counts": {"train": {"a": 7, "b": 7}, "validation": {"a": 2, "b": 2},
                                "test": {"a": 1, "b": 1}},
               "workers": [worker, {**worker, "phase1_frozen_layer_inputs": 10}]}
    path = root / "two-workers-metrics.json"
    path.write_text(json.dumps(metrics))
    return path


def tiny_trees(root: Path) -> dict[str, Path]:
    """split: two classes under train/ (8 each), validation/ and test/ (3 each); flat: two
    classes of 14 images, no split folders."""
    for name, count in (("train", 8), ("validation", 3), ("test", 3)):
        write_class_images(root / "split" / name, ["cats", "dogs"], count, size=32)
    write_class_images(root / "flat", ["cats", "dogs"], 14, size=32, seed=1)
    return {"split": root / "split", "flat": root / "flat"}


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    """The tiny data sets, the scripts' output and their work folders."""
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def bench_arguments(bench_root) -> dict[str, list[str]]:
    return script_arguments(tiny_trees(bench_root), bench_root)


@pytest.fixture(scope="module", autouse=True)
def bench_runs(request, bench_root):
    """Starts the selected scripts of AS_PROCESSES at once, before the module's first test; yields
    name -> (process, stdout file, stderr file)."""
    selected = {item.originalname.removeprefix("test_") for item in request.session.items
                if item.path == Path(__file__)}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("STORAGE_EMULATOR_HOST", None)
    runs = {}
    for name in sorted(selected & AS_PROCESSES):  # none: no arguments made, no VGG16 weights drawn
        bench_arguments = request.getfixturevalue("bench_arguments")
        stdout, stderr = bench_root / f"{name}.json", bench_root / f"{name}.log"
        # A session of its own: memory.py's /usr/bin/time and the jobs under it stop with it.
        process = subprocess.Popen([sys.executable, "-m", f"bench.{name}", *bench_arguments[name]],
                                   cwd=ROOT, env=env, stdout=stdout.open("w"),
                                   stderr=stderr.open("w"), start_new_session=True)
        runs[name] = (process, stdout, stderr)
    yield runs
    for process, _, _ in runs.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def output(bench_runs, name: str) -> dict:
    """The script's JSON on stdout, once it has exited 0."""
    process, stdout, stderr = bench_runs[name]
    code = process.wait(timeout=600)
    assert code == 0, stderr.read_text()[-3000:]
    return json.loads(stdout.read_text())


def main_output(bench_arguments, name: str) -> dict:
    """The JSON that bench.<name>'s main prints, called in this process. What the scripts set for
    their process is put back afterwards: the environment (storage_pull's STORAGE_EMULATOR_HOST),
    Keras' dtype policy (speed's mixed precision) and its global state."""
    import keras

    environ, stdout = dict(os.environ), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            importlib.import_module(f"bench.{name}").main(bench_arguments[name])
    finally:
        os.environ.clear()
        os.environ.update(environ)
        keras.mixed_precision.set_dtype_policy("float32")
        keras.backend.clear_session()
    return json.loads(stdout.getvalue())


@pytest.mark.slow
def test_speed(bench_arguments):
    result = main_output(bench_arguments, "speed")
    assert {"machine", "backbone", "image_size", "images", "tensorflow"} <= set(result)
    assert result["image_size"] == 32 and result["images"] == 4
    assert {"pipeline_images_per_s", "model_training_images_per_s", "ratio"} <= set(result["pipeline"])
    assert {"uncached_epoch_s", "cached_epoch_s", "ratio"} <= set(result["phase1"])
    # phase 2 cuts the classifier where fine-tuning starts (split_for_fine_tuning)
    assert result["phase2"]["fine_tune_from"] == "block5_conv1"
    assert result["phase2"]["cached_epoch_s"] > 0
    extraction = result["extraction"]  # the job's frozen-layer pass against serving
    # the unaugmented training images and validation for phase 1, the views for phase 2
    assert extraction["images_through_frozen_layers"] == (extraction["augment_views"] + 2) * 4
    assert extraction["ratio"] > 0 and extraction["saved_model_batch32_images_per_s"] > 0
    steps = result["steps"]
    assert {(row["phase"], row["xla"]) for row in steps} == {
        (phase, xla) for phase in ("phase 1, augmented", "phase 2") for xla in (False, True)}
    assert all(row["precision"] == "float32" for row in steps)
    assert all(isinstance(row["images_per_s"], float) for row in steps if not row["xla"])
    # a row says whether Keras applied XLA: it does not to the augmentation's random layers
    assert all(row["xla_applied"] in (False, row["xla"]) for row in steps)
    assert [row["xla_applied"] for row in steps if row["phase"] == "phase 2"] == [False, True]


@pytest.mark.slow
def test_storage_pull(bench_arguments):
    result = main_output(bench_arguments, "storage_pull")
    assert result["objects"] == 20 and result["repeats"] == 1
    assert result["parallel_objects_per_s"] > 0 and result["sequential_objects_per_s"] > 0
    assert result["speedup"] > 0


@pytest.mark.slow
def test_scaling(bench_arguments):
    result = main_output(bench_arguments, "scaling")
    table = result["table"]
    assert [(row["images"], row["workers"]) for row in table] == [
        (images, workers) for images in (10_000, 1_000_000, 10_000_000) for workers in (1, 4, 16)]
    for row in table:
        assert row["wall_hours"] >= 0 and row["cost_usd"] >= 0
        assert row["bottleneck"] in row["seconds"]
    one, sixteen = (next(row for row in table if row["images"] == 1_000_000 and
                         row["workers"] == workers) for workers in (1, 16))
    assert sixteen["seconds"]["pull"] == pytest.approx(one["seconds"]["pull"] / 16, abs=1)
    assert sixteen["seconds"]["list"] == one["seconds"]["list"]  # every worker lists it all
    assert one["seconds"]["phase2_allreduce"] == 0 < sixteen["seconds"]["phase2_allreduce"]
    (check,) = result["checks"]
    assert check["workers"] == 2 and check["images"] == 20
    assert check["measured_objects_per_worker"] == [10, 10] and check["largest_deviation"] == 0


@pytest.mark.slow
def test_onnx_float32(bench_arguments):
    result = main_output(bench_arguments, "onnx_float32")
    assert result["backbone"] == "vgg16" and result["image_size"] == 32
    variants = {"tensorflow", "onnxruntime_nhwc_all", "onnxruntime_nhwc_extended",
                "onnxruntime_nchw_all", "openvino_f32"}
    assert set(result["images_per_s"]) == variants == set(result["vs_tensorflow"])
    assert result["vs_tensorflow"]["tensorflow"] == 1.0
    assert all(rate > 0 for rate in result["images_per_s"].values())
    # every layout and runtime computes the same function: float32 rounding apart
    assert max(result["max_abs_diff_vs_tensorflow"].values()) < 1e-4


def test_serving_decode(bench_arguments):
    (figures,) = main_output(bench_arguments, "serving_decode")["pixels"].values()
    assert figures["images"] == 6 and figures["size"] == 16
    assert 0 <= figures["mean_abs_diff"] <= figures["max_abs_diff"] <= 1


@pytest.mark.slow
def test_quality(bench_arguments, bench_root, monkeypatch):
    from bench import quality

    monkeypatch.setattr(quality, "job_process", lambda env: run_in_process("job", env))
    result = main_output(bench_arguments, "quality")
    assert {"backbone", "alpha", "subset_per_class", "settings", "c_grid", "rows"} <= set(result)
    assert result["subset_per_class"] == 12 and result["settings"]["IMAGE_SIZE"] == "32"
    (row,) = result["rows"]
    assert row["seed"] == 7 and row["classes"] == ["cats", "dogs"]
    assert sum(row["images"].values()) == 24  # the subset: 12 per class, split by the job's rule
    probe = row["probe"]
    assert probe["C"] in result["c_grid"]
    for split in ("validation", "test"):
        assert {"accuracy", "macro_recall", "roc_auc", "accuracy_at_threshold"} <= set(probe[split])
    assert probe["wall_seconds"] > 0
    run = row["runs"]["default"]
    assert "exit_code" not in run, run.get("log_tail")
    assert {"wall_seconds", "decision_threshold", "phase1", "phase2"} <= set(run)
    versus = run["versus_probe"]
    assert {"accuracy", "macro_recall", "roc_auc", "accuracy_at_threshold", "accuracy_tta",
            "error_ratio", "error_ratio_at_threshold"} <= set(versus)
    assert versus["same_split_counts"] is True
    assert versus["error_ratio"] is None or versus["error_ratio"] >= 0
    (metrics_file,) = (bench_root / "quality").glob("*/out/default-seed7/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["config"]["seed"] == 7  # --seeds reaches the job as SEED


@pytest.mark.slow
def test_inference(bench_arguments, mobilenet_v2_weights, monkeypatch):
    from bench import inference

    monkeypatch.setattr(inference, "run", lambda module, env: inference.checked(
        run_in_process(module, env)))
    result = main_output(bench_arguments, "inference")
    assert set(result) == {"cpus", "load_average", "mobilenet_v2_050_224"}
    run = result["mobilenet_v2_050_224"]
    assert run["settings"]["IMAGE_SIZE"] == "32"
    for backend in ("tensorflow", "onnx_float32", "onnx_int8"):
        assert run["latency"][backend]["batch1_p50_ms"] > 0
        assert run["latency"][backend]["batch32_images_per_s"] > 0
    assert {"model.onnx", "model.int8.onnx"} <= set(run["sizes_bytes"])
    assert run["onnx_float32_vs_tensorflow_batch32"] > 0
    assert run["onnx_int8_vs_float32_batch1_p50"] > 0 and run["onnx_int8_vs_float32_batch32"] > 0
    assert run["int8_recipe"] in run["int8_recipes_tried"]
    assert 0 <= run["int8_mac_share"] <= 1 and 0 <= run["int8_parity"]["top1_agreement"] <= 1
    assert isinstance(run["export_status"], str)
    assert run["parity_images"] == 2 * 2  # two of the three test images per class: --images-per-class
    assert run["test_split_images"] == 2 * 2 and set(run["test_accuracy"]) >= {"onnx_int8"}
    if importlib.util.find_spec("openvino"):  # timed beside onnxruntime on the same files
        assert run["openvino"].startswith("20")
        assert run["openvino_int8_vs_onnx_float32_batch32"] > 0
        assert set(run["openvino_parity"]) == {"openvino_float32", "openvino_int8"}
    else:
        assert run["openvino"].startswith("skipped: runtime openvino: openvino is not installed")
        assert run["openvino_int8_vs_onnx_float32_batch32"] is None


def test_inference_refuses_a_run_that_is_not_finished(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.inference", "--models", "none",
                             "--run", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert f"--run {tmp_path}: not a finished run (no MANIFEST.json)" in result.stderr


@pytest.mark.slow
def test_memory(bench_runs):
    result = output(bench_runs, "memory")
    assert result["backbone"] == "vgg16" and result["image_size"] == 32
    assert [run["train_images"] for run in result["runs"]] == [4, 16]
    assert all(run["peak_rss_mib"] > 0 and run["wall"] for run in result["runs"])
    assert result["rss_ratio_4x_data"] > 0


def test_link_slice(tmp_path):
    """devkit/datasets.py: the first N of each class per split, as absolute links, idempotent."""
    source = tmp_path / "source"
    for name, count in (("train", 5), ("test", 3)):
        write_class_images(source / name, ["a", "b"], count, size=8)
    relative = Path(os.path.relpath(source, Path.cwd()))
    for _ in range(2):  # a second slice in the same place keeps the links already there
        target = link_slice(relative, tmp_path / "slice", {"train": 2, "test": 5})
    for name, count in (("train", 2), ("test", 3)):
        for label in ("a", "b"):
            links = sorted((target / name / label).iterdir())
            assert len(links) == count
            assert all(link.is_symlink() and Path(os.readlink(link)).is_absolute() for link in links)
            originals = sorted(path.name for path in (source / name / label).iterdir())
            assert [link.name for link in links] == originals[:count]
