"""Pipeline: one export, from a finished run directory to gated ONNX models and export_report.json.

Steps: fetch the run, re-discover its data splits, rebuild the classifier in float32 with the
run's weights, convert (model.onnx), quantize (model.int8.onnx), compare both with TensorFlow on
the run's test images, time all three, then publish the models that passed and, last,
export_report.json (the export's completion marker, also written when a gate fails).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from export import convert, measure
from edge.images import load_images
from job.report import sha256, write_json
from edge.runtime import available_cores, cpu_session
from export.config import ExportConfig
from export.errors import BadInput, ExportError, GateFailed

log = logging.getLogger("export")

REPORT = "export_report.json"
FLOAT32_MODEL, INT8_MODEL = "model.onnx", "model.int8.onnx"
RUN_FILES = ("MANIFEST.json", "metrics.json", "model.keras", "labels.txt", "saved_model")


def export_run(config: ExportConfig) -> dict:
    """Exports the run at config.run_uri; returns the report. Raises GateFailed after publishing
    the report (marked failed) when a parity gate fails, BadInput for an unusable run or data."""
    from job import storage

    started = time.perf_counter()
    try:
        storage.claim_cache(config.cache_dir)
    except storage.Unusable as error:
        raise BadInput(f"CACHE_DIR: {error}") from None
    try:
        run_dir = storage.fetch_tree(config.run_uri, config.cache_dir / "runs")
    except storage.StorageError as error:
        if storage.is_remote(config.run_uri):
            raise  # may be transient: exit 1
        raise BadInput(f"RUN_URI={config.run_uri}: {error}") from None
    metrics = read_run(run_dir, config.run_uri)
    classes = metrics["classes"]
    size = int(metrics["config"]["image_size"])
    threshold = float(metrics.get("decision_threshold", 0.5))
    dataset = load_data(config, metrics)
    parity_split = sample(dataset.test, config.parity_images, seed=int(metrics["config"]["seed"]))
    calibration = sample(dataset.train, config.calibration_images,
                         seed=int(metrics["config"]["seed"]) + 1)
    seconds: dict[str, float] = {}
    quantization = None

    config.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=config.cache_dir) as scratch:
        staging = Path(scratch)
        clock = time.perf_counter()
        rebuilt, trained = convert.rebuild_float32(run_dir, metrics)
        del trained
        proto = convert.to_onnx(rebuilt, size, config.opset)
        half = convert.float16_tensors(proto)
        if half:
            raise ExportError(f"the converted graph holds float16 tensors: {half[:5]}")
        convert.set_metadata(proto, convert.metadata(metrics, config.run_uri, config.opset,
                                                     "float32"))
        convert.check(proto)
        save(proto, staging / FLOAT32_MODEL)
        opsets = {FLOAT32_MODEL: config.opset}
        seconds["convert"] = round(time.perf_counter() - clock, 2)
        log.info("converted to ONNX opset %d in %.1f s", config.opset, seconds["convert"])

        if config.int8:
            from export.quantize import quantize_int8

            clock = time.perf_counter()
            quantization = quantize_int8(staging / FLOAT32_MODEL, staging / INT8_MODEL,
                                         calibration.paths, size)
            int8_proto = load(staging / INT8_MODEL)
            opsets[INT8_MODEL] = convert.opset_of(int8_proto)
            convert.set_metadata(int8_proto, convert.metadata(
                metrics, config.run_uri, opsets[INT8_MODEL],
                f"int8 ({quantization['method']}; {len(calibration)} calibration images)"))
            convert.check(int8_proto)
            save(int8_proto, staging / INT8_MODEL)
            seconds["quantize"] = round(time.perf_counter() - clock, 2)

        clock = time.perf_counter()
        images = load_images(parity_split.paths, size)
        labels = np.asarray(parity_split.labels)
        threads = config.intra_op_threads
        backends = {"tensorflow": measure.saved_model_predictor(run_dir / "saved_model"),
                    "onnx_float32": measure.onnx_predictor(
                        cpu_session(staging / FLOAT32_MODEL, threads))}
        if config.int8:
            backends["onnx_int8"] = measure.onnx_predictor(
                cpu_session(staging / INT8_MODEL, threads))
        outputs = {name: measure.predict_all(predict, images) for name, predict in backends.items()}
        outputs["tensorflow_float32_rebuild"] = measure.predict_all(
            measure.keras_predictor(rebuilt), images)
        parity, failures = judge(outputs, labels, threshold, metrics.get("precision_policy", ""),
                                 config.int8_min_agreement, config.int8_max_accuracy_drop)
        parity["images"] = int(len(images))
        parity["test_split_images"] = len(dataset.test)
        seconds["parity"] = round(time.perf_counter() - clock, 2)
        for failure in failures:
            log.error("gate failed: %s", failure)

        clock = time.perf_counter()
        load_before = round(os.getloadavg()[0], 2)
        latency = {name: measure.latency(predict, images, config.latency_runs)
                   for name, predict in backends.items()}
        seconds["latency"] = round(time.perf_counter() - clock, 2)
        for name, figures in latency.items():
            log.info("latency %s: %s", name, figures)

        passed = {FLOAT32_MODEL: not any(f.startswith("float32") for f in failures)}
        if config.int8:
            passed[INT8_MODEL] = passed[FLOAT32_MODEL] and not any(
                f.startswith("int8") for f in failures)
        for name, ok in passed.items():
            if ok:
                stamp_passed(staging / name, parity)
        sizes = {"saved_model": tree_bytes(run_dir / "saved_model"),
                 "model.keras": (run_dir / "model.keras").stat().st_size,
                 **{name: (staging / name).stat().st_size for name in passed}}
        files = {}
        for name, ok in passed.items():
            if ok:
                files[name] = {"bytes": (staging / name).stat().st_size,
                               "sha256": sha256(staging / name)}
            else:
                (staging / name).unlink()
        shutil.copy2(run_dir / "labels.txt", staging / "labels.txt")
        seconds["total"] = round(time.perf_counter() - started, 2)
        report = {
            "status": "failed" if failures else "passed",
            "failed_gates": failures,
            "run_id": metrics.get("run_id"),
            "run_uri": config.run_uri,
            "export_uri": config.target_uri,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "opsets": opsets,
            "classes": classes,
            "image_size": size,
            "decision_threshold": threshold,
            "training_precision_policy": metrics.get("precision_policy"),
            "parity": parity,
            "gates": {"float32": {"max_abs_diff": measure.FLOAT32_MAX_ABS_DIFF,
                                  "top1_agreement": measure.FLOAT32_MIN_AGREEMENT},
                      "int8": {"top1_agreement": config.int8_min_agreement,
                               "max_accuracy_difference": config.int8_max_accuracy_drop}},
            "sizes_bytes": sizes,
            "latency": latency,
            "latency_settings": {"onnxruntime_intra_op_threads": threads,
                                 "onnxruntime_graph_optimization": "ORT_ENABLE_ALL",
                                 "tensorflow_threads": "TensorFlow defaults (all cores)",
                                 "cpu_cores_available": available_cores(),
                                 "load_average_1m_before": load_before},
            "quantization": quantization if config.int8 else None,
            "files": files,
            "seconds": seconds,
            "versions": versions(),
        }
        write_json(staging / REPORT, report)
        publish(staging, config.target_uri, [n for n, ok in passed.items() if not ok])
    log.info("export %s: %s", report["status"], config.target_uri)
    if failures:
        raise GateFailed("; ".join(failures) + f" (see {REPORT} at {config.target_uri})")
    return report


def read_run(run_dir: Path, run_uri: str) -> dict:
    """metrics.json of a complete run; BadInput naming what is missing otherwise."""
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    if "MANIFEST.json" in missing:
        raise BadInput(f"RUN_URI={run_uri}: no MANIFEST.json, so the run is not complete "
                       "(or this is not a run directory)")
    if missing:
        raise BadInput(f"RUN_URI={run_uri}: the run lacks {', '.join(missing)}")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["config"]["image_size"], metrics["config"]["backbone"], metrics["classes"]
    except (ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{run_dir / 'metrics.json'}: unreadable or incomplete ({error})") from None
    labels = (run_dir / "labels.txt").read_text().split("\n")
    if [line for line in labels if line] != metrics["classes"]:
        raise BadInput(f"{run_dir}: labels.txt and metrics.json disagree on the classes")
    return metrics


def load_data(config: ExportConfig, metrics: dict):
    """The run's data set, split exactly as in training (the same layout rules and seed)."""
    from job import data, storage

    run_config = metrics["config"]
    data_uri = config.data_uri or run_config.get("data_uri", "")
    if not data_uri:
        raise BadInput("the run records no DATA_URI; set DATA_URI to its data for calibration "
                       "and parity")
    try:
        root = storage.fetch_tree(data_uri, config.cache_dir / "data")
        dataset = data.load_dataset(root, int(run_config["image_size"]),
                                    float(run_config["validation_split"]),
                                    float(run_config["test_split"]), int(run_config["seed"]))
    except (storage.StorageError, data.DataError) as error:
        raise BadInput(f"DATA_URI={data_uri}: {error}") from None
    if dataset.class_names != metrics["classes"]:
        raise BadInput(f"DATA_URI={data_uri}: classes {dataset.class_names} are not the run's "
                       f"{metrics['classes']}")
    if len(dataset.test) == 0:
        raise BadInput(f"DATA_URI={data_uri}: the run has no test images to check parity on")
    return dataset


def sample(split, count: int, seed: int):
    """Up to count images of a split, drawn at random (seeded) so every class is represented."""
    from job.data import Split

    order = np.random.default_rng(seed).permutation(len(split))[:count]
    order.sort()
    return Split([split.paths[i] for i in order], [split.labels[i] for i in order])


def judge(outputs: dict, labels: np.ndarray, threshold: float, precision_policy: str,
          int8_min_agreement: float, int8_max_accuracy_drop: float):
    """Parity figures and the failed gates (a list of one-line reasons, empty when all passed).

    The float32 gate compares with the SavedModel when the run trained in float32. Under mixed
    precision the SavedModel computes in float16, so the gate compares with the float32 rebuild
    of the same weights run by TensorFlow, and the SavedModel must agree on >= 99% of labels.
    """
    mixed = precision_policy.startswith("mixed")
    reference_name = "tensorflow_float32_rebuild" if mixed else "tensorflow"
    reference = outputs[reference_name]
    accuracies = {name: measure.accuracy(values, labels, threshold)
                  for name, values in outputs.items()}
    parity = {"reference": reference_name, "accuracy": accuracies,
              "float32": measure.compare(outputs["onnx_float32"], reference, threshold),
              "rebuild_vs_saved_model": measure.compare(outputs["tensorflow_float32_rebuild"],
                                                        outputs["tensorflow"], threshold)}
    failures = []
    gate = measure.float32_gate(parity["float32"])
    if gate:
        failures.append(gate)
    if mixed:
        parity["saved_model_vs_onnx_float32"] = measure.compare(
            outputs["onnx_float32"], outputs["tensorflow"], threshold)
        agreement = parity["saved_model_vs_onnx_float32"]["top1_agreement"]
        if agreement < measure.INT8_MIN_AGREEMENT:
            failures.append(f"float32: top-1 agreement with the {precision_policy} SavedModel "
                            f"{agreement:.2%} < {measure.INT8_MIN_AGREEMENT:.0%}")
    if "onnx_int8" in outputs:
        parity["int8"] = measure.compare(outputs["onnx_int8"], reference, threshold)
        parity["int8"]["accuracy_difference"] = accuracies["onnx_int8"] - accuracies["onnx_float32"]
        gate = measure.int8_gate(parity["int8"], accuracies["onnx_int8"],
                                 accuracies["onnx_float32"], int8_min_agreement,
                                 int8_max_accuracy_drop)
        if gate:
            failures.append(gate)
    return parity, failures


def stamp_passed(path: Path, parity: dict) -> None:
    """Records in a model's metadata that it passed its parity gates, and with what figures."""
    proto = load(path)
    key = "int8" if path.name == INT8_MODEL else "float32"
    convert.set_metadata(proto, {"parity": json.dumps({
        "status": "passed", "reference": parity["reference"], "images": parity.get("images"),
        **parity[key], "accuracy": parity["accuracy"]["onnx_" + key]})})
    save(proto, path)


def publish(staging: Path, target_uri: str, withdrawn: list[str]) -> None:
    """Copies the staged files to target_uri, the report last; removes local stale models that
    did not pass this time (a gs:// target keeps them: its export_report.json is authoritative)."""
    from job import storage

    if not storage.is_remote(target_uri):
        Path(target_uri).mkdir(parents=True, exist_ok=True)
        for name in withdrawn:
            Path(target_uri, name).unlink(missing_ok=True)
    storage.publish_tree(staging, target_uri, last=REPORT)


def save(proto, path: Path) -> None:
    import onnx

    onnx.save(proto, str(path))


def load(path: Path):
    import onnx

    return onnx.load(str(path))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def versions() -> dict:
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
