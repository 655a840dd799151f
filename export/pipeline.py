"""Pipeline: one export, from a finished run directory to gated ONNX models and export_report.json.

export_run tells it in order: fetch the run, check every file against its MANIFEST.json and read
its record; check the target (export.target: this run's or nobody's); re-discover its data splits
and sample the parity and calibration images; build each row of the format table
(export.formats: model.onnx, then model.int8.onnx from it) and count the operators onnxruntime
runs in int8 in each; compare every model with TensorFlow on the run's test images and apply each
format's gate; time every backend (and, where installed, OpenVINO on the same files: measured
beside onnxruntime, not gated) and name the fastest passed file (warning where int8 is the
slower); stamp the models that passed and publish them with the run's report page rendered
again with the export's figures (export_report.html), and last export_report.json (the export's
completion marker, also written when a gate fails; a failed export beside an earlier one
replaces nothing: export.target).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common.record import RecordError, RunRecord
from common.run_files import (EXPORT_REPORT, KERAS_MODEL, LABELS, MANIFEST, METRICS, PREDICTIONS,
                              RUN_PAGE, run_fingerprint, sha256, write_json)
from edge.runtime import (
    RuntimeUnavailable,
    available_cores,
    cpu_description,
    cpu_session,
    open_model,
    require_runtime,
)
from export import convert, measure
from export import target as export_target
from export.config import ExportConfig
from export.errors import BadInput, GateFailed
from export.formats import (
    INT8_MODEL,
    REBUILD,
    SAVED_MODEL,
    BuildContext,
    Format,
    Verdict,
    export_formats,
    judge,
)
from export.int8.census import int8_census
from export.export_report import build_report
from export.selftest import stage_selftest
from export.target import PAGE, Run
from job.results import run_page
from storage import join, name_problem

log = logging.getLogger("export")

OPTIONAL_RUNTIMES = ("openvino",)  # timed beside onnxruntime where installed (edge.runtime)
RUN_FILES = (MANIFEST, METRICS, KERAS_MODEL, LABELS, "saved_model")


def export_run(config: ExportConfig) -> dict:
    """Exports the run at config.run_uri; returns the report. Raises GateFailed after publishing
    the report (marked failed) when a parity gate fails, BadInput for an unusable run or data."""
    started, seconds = time.perf_counter(), {}
    run_dir = fetch_run(config)
    record = read_run(run_dir, config.run_uri)
    run = Run(run_fingerprint(json.loads((run_dir / MANIFEST).read_text())), record.run_id,
              config.run_uri)
    target = inspect_target(config, run_dir, run)
    dataset = load_data(config, record)
    parity_split = sample(dataset.test, config.parity_images, seed=record.seed)
    calibration = sample(dataset.train, config.calibration_images, seed=record.seed + 1)
    formats = export_formats(config)
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=config.cache_dir) as scratch:
        context = BuildContext(config, record, run_dir, Path(scratch), calibration,
                               parity_split)
        opsets, notes = build_formats(formats, context, seconds)
        operators = {row.file: int8_census(context.staging / row.file, config.intra_op_threads)
                     for row in formats}
        with timed(seconds, "parity"):
            images = context.parity_images
            side_runtimes, runtime_notes = side_by_side(formats, context)
            backends = {**predictors(formats, context), **side_runtimes}
            outputs = predict_outputs(backends, images, context.rebuilt)
            verdict = judge(outputs, np.asarray(parity_split.labels), record, config)
            verdict.parity.update(images=int(len(images)), test_split_images=len(dataset.test),
                                  **side_by_side_parity(side_runtimes, outputs, verdict, record))
        for failure in verdict.failures:
            log.error("gate failed: %s", failure)
        with timed(seconds, "latency"):
            latency, latency_settings = time_backends(backends, images, config)
            latency_settings.update(runtime_notes)
        files = stamp_passed(formats, context.staging, verdict)
        shutil.copy2(run_dir / LABELS, context.staging / LABELS)
        seconds["total"] = round(time.perf_counter() - started, 2)
        report = build_report(
            config, record, verdict, opsets=opsets, files=files, run_sizes=run_sizes(run_dir),
            latency=latency, latency_settings=latency_settings, operators=operators,
            quantization=notes.get("int8"), run_fingerprint=run.fingerprint,
            seconds=seconds, versions=versions(), created_utc=utc_now())
        warn_if_int8_is_slower(report)
        report["selftest"] = stage_selftest(context, formats, verdict, outputs)
        write_json(context.staging / EXPORT_REPORT, report)
        render_run_report(run_dir, context.staging, report, dataset.root)
        published_as = export_target.publish(
            context.staging, [*files_passed(formats, verdict), *selftest_files(report), LABELS, PAGE,
                              EXPORT_REPORT], target, passed=not verdict.failures)
    log.info("export %s: %s", report["status"], join(config.target_uri, published_as))
    if verdict.failures:
        raise GateFailed("; ".join(verdict.failures)
                         + f" (see {published_as} at {config.target_uri})")
    return report


def fetch_run(config: ExportConfig) -> Path:
    """The run directory, fetched into the cache; BadInput when the cache or a local run is
    unusable. A gs:// run that cannot be fetched raises StorageError: that may be transient."""
    import storage

    try:
        storage.claim_cache(config.cache_dir)
    except storage.Unusable as error:
        raise BadInput(f"CACHE_DIR: {error}") from None
    try:
        return storage.fetch_tree(config.run_uri, config.cache_dir / "runs")
    except storage.StorageError as error:
        if storage.is_remote(config.run_uri):
            raise  # exit 1: retrying may help
        raise BadInput(f"RUN_URI={config.run_uri}: {error}") from None


def read_run(run_dir: Path, run_uri: str) -> RunRecord:
    """The record of a complete run whose files match its MANIFEST.json; BadInput naming what is
    missing, damaged or unreadable otherwise."""
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    if MANIFEST in missing:
        raise BadInput(f"RUN_URI={run_uri}: no {MANIFEST}, so the run is not complete "
                       "(or this is not a run directory)")
    if missing:
        raise BadInput(f"RUN_URI={run_uri}: the run lacks {', '.join(missing)}")
    verify_files(run_dir, run_uri)
    try:
        record = RunRecord.from_metrics(json.loads((run_dir / METRICS).read_text()))
    except (ValueError, RecordError) as error:  # not JSON, or no complete record
        raise BadInput(f"{run_dir / 'metrics.json'}: unreadable or incomplete ({error})") from None
    labels = (run_dir / LABELS).read_text().split("\n")
    if [line for line in labels if line] != record.classes:
        raise BadInput(f"{run_dir}: labels.txt and metrics.json disagree on the classes")
    return record


def verify_files(run_dir: Path, run_uri: str) -> None:
    """Checks every file MANIFEST.json lists, by size and SHA-256, before anything is read of the
    run: a truncated or altered file is BadInput naming it, not a traceback from the reader
    that trips over it."""
    try:
        listed = json.loads((run_dir / MANIFEST).read_text())["files"]
        expected = {name: (int(file["bytes"]), str(file["sha256"])) for name, file in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInput(f"RUN_URI={run_uri}: {MANIFEST} is unreadable "
                       f"({error.__class__.__name__}: {error})") from None
    for name, (size, checksum) in sorted(expected.items()):
        path = run_dir / name
        if name_problem(name):
            problem = f"is not a name under the run ({name_problem(name)})"
        elif not path.is_file():
            problem = f"is missing ({MANIFEST} lists it)"
        elif path.stat().st_size != size:
            problem = f"has {path.stat().st_size} bytes, {MANIFEST} lists {size}"
        elif sha256(path) != checksum:
            problem = f"does not match its SHA-256 in {MANIFEST}"
        else:
            continue
        if name == RUN_PAGE and exported_before_the_manifest_rule(run_dir):
            log.warning("%s differs from its checksum in %s: an export made before the run's "
                        "files were kept rewrote it (its page is %s now)", RUN_PAGE,
                        MANIFEST, PAGE)
            continue
        raise BadInput(f"RUN_URI={run_uri}: {name} {problem}: the run is damaged or was changed "
                       "after it completed; export a complete copy of it")


def exported_before_the_manifest_rule(run_dir: Path) -> bool:
    """Whether the run directory holds an export made before exports kept the run's files (its
    report has no run_fingerprint): those rewrote report.html there, nothing else."""
    try:
        report = json.loads((run_dir / EXPORT_REPORT).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "run_fingerprint" not in report


def inspect_target(config: ExportConfig, run_dir: Path, run: Run) -> export_target.Target:
    """The export's target, made if need be and checked to be this run's or nobody's."""
    import storage

    setting = "EXPORT_URI" if config.export_uri else "RUN_URI"
    try:
        storage.check_writable(config.target_uri)
    except storage.Unusable as error:
        raise BadInput(f"{setting}: {error}") from None
    return export_target.inspect(config.target_uri, setting, run_dir, run)


def load_data(config: ExportConfig, record: RunRecord):
    """The run's data set, split exactly as in training (the same layout rules, seed and, for a
    run of several workers, shards)."""
    import storage
    from job.inputs import data

    data_uri = config.data_uri or record.data_uri
    if not data_uri:
        raise BadInput("the run records no DATA_URI; set DATA_URI to its data for calibration "
                       "and parity")
    try:
        root = storage.fetch_tree(data_uri, config.cache_dir / "data")
        dataset = data.load_as_split_by(record.data_shards, root, record.image_size,
                                        record.validation_split, record.test_split, record.seed)
    except (storage.StorageError, data.DataError) as error:
        raise BadInput(f"DATA_URI={data_uri}: {error}") from None
    if dataset.class_names != record.classes:
        raise BadInput(f"DATA_URI={data_uri}: classes {dataset.class_names} are not the run's "
                       f"{record.classes}")
    if len(dataset.test) == 0:
        raise BadInput(f"DATA_URI={data_uri}: the run has no test images to check parity on")
    return dataset


def render_run_report(run_dir: Path, staging: Path, report: dict, data_root: Path) -> None:
    """Stages the run's report page again, its export section filled in, as export_report.html
    beside export_report.json: under its own name, so the run's report.html (which MANIFEST.json
    lists) stays the training's. It is drawn from metrics.json and test_predictions.json
    (written by the training for this), not from the export's own parity sample, so it shows
    the same run; the thumbnails come from data_root, where load_data found the run's data."""
    metrics = json.loads((run_dir / METRICS).read_text())
    predictions = run_page.read_predictions(run_dir / PREDICTIONS, data_root)
    run_page.write_page(staging / PAGE, metrics, predictions, report)


def sample(split, count: int, seed: int):
    """Up to count images of a split, drawn at random (seeded) so every class is represented."""
    from job.inputs.data import Split

    order = np.random.default_rng(seed).permutation(len(split))[:count]
    order.sort()
    return Split([split.paths[i] for i in order], [split.labels[i] for i in order])


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str):
    """Records the block's wall time in seconds[key], rounded to 10 ms."""
    clock = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - clock, 2)


def build_formats(formats: tuple[Format, ...], context: BuildContext,
                  seconds: dict[str, float]) -> tuple[dict[str, int], dict[str, dict]]:
    """Builds each format in table order, labels and checks it and stages its file; returns
    each file's opset and each format's build notes (int8: what quantization did)."""
    opsets, notes = {}, {}
    for row in formats:
        with timed(seconds, row.key):
            proto, row_notes = row.build(context)
            opsets[row.file] = convert.opset_of(proto)
            convert.set_metadata(proto, convert.metadata(
                context.record, context.config.run_uri, opsets[row.file],
                row.precision.format(**(row_notes or {}))))
            convert.check(proto)
            convert.save(proto, context.staging / row.file)
        if row_notes is not None:
            notes[row.key] = row_notes
        log.info("%s: %s at opset %d, built in %.1f s", row.file, row.key, opsets[row.file],
                 seconds[row.key])
    return opsets, notes


def predictors(formats: tuple[Format, ...], context: BuildContext) -> dict[str, measure.Predict]:
    """The SavedModel and every staged model as predictors, by backend name."""
    threads = context.config.intra_op_threads
    return {SAVED_MODEL: measure.saved_model_predictor(context.run_dir / "saved_model"),
            **{row.backend: measure.onnx_predictor(cpu_session(context.staging / row.file, threads))
               for row in formats}}


def side_by_side(formats: tuple[Format, ...], context: BuildContext
                 ) -> tuple[dict[str, measure.Predict], dict[str, str]]:
    """Every staged model run by each optional runtime as well (edge.runtime: OpenVINO reads the
    same ONNX files), by backend name ("openvino_int8"), measured beside onnxruntime but not
    gated: onnxruntime is what the predictor runs by default. Also, per optional runtime, its
    version or why it was skipped (not installed: the training image has no OpenVINO)."""
    models, notes = {}, {}
    for name in OPTIONAL_RUNTIMES:
        try:
            notes[name] = require_runtime(name)
        except RuntimeUnavailable as error:
            log.info("%s not measured: %s", name, error)
            notes[name] = f"skipped: {error}"
            continue
        for row in formats:
            model = open_model(context.staging / row.file, name, context.config.intra_op_threads)
            models[f"{name}_{row.key}"] = model.run
    return models, notes


def side_by_side_parity(side_runtimes: dict[str, measure.Predict],
                        outputs: dict[str, np.ndarray], verdict: Verdict,
                        record: RunRecord) -> dict:
    """Each optional runtime's figures against the gates' reference, by backend name beside the
    formats' own ("int8"), so its int8 model is compared with onnxruntime's at the same
    agreement."""
    reference = outputs[verdict.parity["reference"]]
    return {name: measure.compare(outputs[name], reference, record.decision_threshold)
            for name in side_runtimes}


def predict_outputs(backends: dict[str, measure.Predict], images: np.ndarray,
                    rebuilt) -> dict[str, np.ndarray]:
    """Every backend's probabilities on the images, and the float32 rebuild's (the reference of
    a mixed-precision run; not timed, it is not a deployable model)."""
    outputs = {name: measure.predict_all(predict, images, f"parity, {name}")
               for name, predict in backends.items()}
    outputs[REBUILD] = measure.predict_all(measure.keras_predictor(rebuilt), images,
                                           f"parity, {REBUILD}")
    return outputs


def time_backends(backends: dict[str, measure.Predict], images: np.ndarray,
                  config: ExportConfig) -> tuple[dict, dict]:
    """Each backend's CPU latency, and the settings it was measured under."""
    load_before = round(os.getloadavg()[0], 2)
    latency = {name: measure.latency(predict, images, config.latency_runs)
               for name, predict in backends.items()}
    for name, figures in latency.items():
        log.info("latency %s: %s", name, figures)
    return latency, {"onnxruntime_intra_op_threads": config.intra_op_threads,
                     "onnxruntime_graph_optimization": "ORT_ENABLE_ALL",
                     "tensorflow_threads": "TensorFlow defaults (all cores)",
                     "cpu": cpu_description(), "cpu_cores_available": available_cores(),
                     "load_average_1m_before": load_before}


def warn_if_int8_is_slower(report: dict) -> None:
    """Warns where the int8 file passed yet onnxruntime runs another file faster on this CPU
    (the `mixed_16bit` fallback is smaller than float32 but slower): the report's "fastest"
    names the file to ship where speed matters."""
    slower_at = [size for size, fastest in report["fastest"].items()
                 if fastest["file"] != INT8_MODEL]
    if INT8_MODEL in report["files"] and slower_at:
        log.warning("%s (int8 recipe %s) is slower in onnxruntime on this CPU than %s (%s): ship "
                    "that where speed matters, %s where size does; export_report.json: fastest",
                    INT8_MODEL, report["quantization"]["recipe"],
                    report["fastest"][slower_at[0]]["file"], ", ".join(slower_at), INT8_MODEL)


def stamp_passed(formats: tuple[Format, ...], staging: Path, verdict: Verdict) -> dict[str, dict]:
    """Records in each passed model's metadata that it passed, and with what figures; returns
    the bytes and sha256 of every staged model, stamped or not."""
    parity = verdict.parity
    for row in formats:
        if verdict.passed[row.key]:
            proto = convert.load(staging / row.file)
            convert.set_metadata(proto, {"parity": json.dumps({
                "status": "passed", "reference": parity["reference"],
                "images": parity.get("images"), **parity[row.key],
                "accuracy": parity["accuracy"][row.backend]})})
            convert.save(proto, staging / row.file)
    return {row.file: {"bytes": (staging / row.file).stat().st_size,
                       "sha256": sha256(staging / row.file)} for row in formats}


def files_passed(formats: tuple[Format, ...], verdict: Verdict) -> list[str]:
    """The model files that passed their gates: the only ones published."""
    return [row.file for row in formats if verdict.passed[row.key]]


def selftest_files(report: dict) -> list[str]:
    """The staged self-test set's files (export/selftest.py), as names under the target."""
    selftest = report.get("selftest") or {}
    return [f"{selftest['folder']}/{name}" for name in selftest.get("bytes", {})]


def run_sizes(run_dir: Path) -> dict[str, int]:
    """Bytes of the run's own models, for comparison with the ONNX files."""
    return {"saved_model": sum(path.stat().st_size for path in (run_dir / "saved_model").rglob("*")
                               if path.is_file()),
            "model.keras": (run_dir / "model.keras").stat().st_size}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
