"""The export's decisions on small arrays: the format table, the gates, the report and the run record.

No TensorFlow model is built: the gates see synthetic probabilities, the report builder synthetic
figures, read_run a run directory of placeholder files.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.run_files import write_manifest
from export.config import ExportConfig
from export.errors import BadInput
from export.export_report import build_report
from export.formats import FLOAT32_MODEL, INT8_MODEL, REBUILD, Verdict, export_formats, judge
from export.pipeline import RUN_FILES, read_run, warn_if_int8_is_slower
from tests.conftest import gate_outputs, run_record

SETTINGS = ExportConfig(run_uri="/runs/run", export_uri="/exports/run")
MIXED = run_record(precision_policy="mixed_float16")


def with_labels_flipped(probabilities: np.ndarray, count: int) -> np.ndarray:
    flipped = probabilities.copy()
    flipped[:count] = 1 - flipped[:count]
    return flipped


# --- The format table. ---


def test_formats_are_float32_then_int8_which_is_quantized_from_it():
    assert [(row.key, row.file) for row in export_formats(SETTINGS)] == [
        ("float32", FLOAT32_MODEL), ("int8", INT8_MODEL)]


def test_int8_off_leaves_only_float32():
    assert [row.key for row in export_formats(ExportConfig(run_uri="run", int8=False))] == [
        "float32"]


# --- The gates (judge). ---


def test_models_that_match_the_saved_model_pass_every_gate():
    outputs, labels = gate_outputs(flipped=0)
    verdict = judge(outputs, labels, run_record(), SETTINGS)
    assert verdict.failures == []
    assert verdict.passed == {"float32": True, "int8": True}
    assert verdict.parity["reference"] == "tensorflow"


def test_float32_fails_when_a_probability_moves_more_than_1e_4():
    outputs, labels = gate_outputs(flipped=0)
    outputs["onnx_float32"] = outputs["onnx_float32"] + 2e-4  # every label unchanged
    verdict = judge(outputs, labels, run_record(), SETTINGS)
    assert verdict.failures == ["float32: max |diff| 0.0002 > 0.0001"]
    assert verdict.passed["float32"] is False


def test_float32_fails_when_a_single_label_differs():
    outputs, labels = gate_outputs(flipped=0)
    outputs["onnx_float32"] = with_labels_flipped(outputs["onnx_float32"], 1)
    failures = judge(outputs, labels, run_record(), SETTINGS).failures
    assert failures[0].startswith("float32: ") and "top-1 agreement 99.50% < 100%" in failures[0]


def test_int8_is_withheld_when_float32_failed_though_its_own_gate_passed():
    outputs, labels = gate_outputs(flipped=0)
    outputs["onnx_float32"] = outputs["onnx_float32"] + 2e-4
    verdict = judge(outputs, labels, run_record(), SETTINGS)
    assert [failure.split(":")[0] for failure in verdict.failures] == ["float32"]
    assert verdict.passed == {"float32": False, "int8": False}


def test_int8_figures_include_its_accuracy_difference_from_float32():
    outputs, labels = gate_outputs(flipped=4)
    figures = judge(outputs, labels, run_record(), SETTINGS).parity["int8"]
    assert figures["accuracy_difference"] == pytest.approx(-0.02)
    assert figures["top1_agreement"] == 0.98


def test_without_int8_there_are_no_int8_figures_or_verdict():
    outputs, labels = gate_outputs(flipped=200)  # int8 outputs, if looked at, would fail
    del outputs["onnx_int8"]
    verdict = judge(outputs, labels, run_record(), ExportConfig(run_uri="run", int8=False))
    assert verdict.failures == []
    assert verdict.passed == {"float32": True}
    assert "int8" not in verdict.parity


def test_a_float32_run_is_not_checked_against_the_saved_model_twice():
    outputs, labels = gate_outputs(flipped=0)
    assert "saved_model_vs_onnx_float32" not in judge(outputs, labels, run_record(),
                                                      SETTINGS).parity


def test_a_mixed_precision_run_is_gated_against_the_float32_rebuild():
    outputs, labels = gate_outputs(flipped=0)
    outputs["tensorflow"] = outputs["tensorflow"] + 1e-3  # float16 rounding, same labels
    verdict = judge(outputs, labels, MIXED, SETTINGS)
    assert verdict.failures == []
    assert verdict.parity["reference"] == REBUILD
    assert verdict.parity["float32"]["max_abs_diff"] == 0
    assert verdict.parity["saved_model_vs_onnx_float32"]["top1_agreement"] == 1.0


def test_a_mixed_precision_run_fails_when_its_saved_model_disagrees_on_over_1_percent():
    outputs, labels = gate_outputs(flipped=0)
    outputs["tensorflow"] = with_labels_flipped(outputs["tensorflow"], 3)
    verdict = judge(outputs, labels, MIXED, SETTINGS)
    assert verdict.failures == [
        "float32: top-1 agreement with the mixed_float16 SavedModel 98.50% < 99%"]
    assert verdict.passed == {"float32": False, "int8": False}


# --- The report (build_report). ---


def report_of(verdict: Verdict, settings: ExportConfig = SETTINGS, latency: dict | None = None
              ) -> dict:
    files = {FLOAT32_MODEL: {"bytes": 4000, "sha256": "f" * 64},
             INT8_MODEL: {"bytes": 1000, "sha256": "8" * 64}}
    return build_report(
        settings, run_record(decision_threshold=0.4), verdict,
        opsets={FLOAT32_MODEL: 17, INT8_MODEL: 21}, files=files,
        run_sizes={"saved_model": 9000, "model.keras": 5000},
        latency=latency or {"tensorflow": {"batch1_p50_ms": 1.0}}, latency_settings={"threads": 2},
        operators={INT8_MODEL: {"int8_mac_share": 1.0}},
        quantization={"method": "static"}, run_fingerprint="ab" * 32, seconds={"total": 1.0},
        versions={"onnx": "1"}, created_utc="2026-01-01T00:00:00+00:00")


PASSED = Verdict({"reference": "tensorflow"}, [], {"float32": True, "int8": True})
INT8_FAILED = Verdict({"reference": "tensorflow"}, ["int8: top-1 agreement 90.00% < 99.0%"],
                      {"float32": True, "int8": False})


def test_report_has_the_keys_of_export_report_json():
    assert list(report_of(PASSED)) == [
        "status", "failed_gates", "run_id", "run_uri", "run_fingerprint", "export_uri", "created_utc", "opsets",
        "classes", "image_size", "decision_threshold", "training_precision_policy", "parity",
        "gates", "sizes_bytes", "latency", "latency_settings", "fastest", "operators", "quantization",
        "files", "seconds", "versions"]


def test_report_of_passed_gates_is_passed_with_no_failed_gates():
    report = report_of(PASSED)
    assert report["status"] == "passed" and report["failed_gates"] == []


def test_report_of_a_failed_gate_is_failed_and_names_it():
    report = report_of(INT8_FAILED)
    assert report["status"] == "failed"
    assert report["failed_gates"] == ["int8: top-1 agreement 90.00% < 99.0%"]


def test_report_lists_only_the_passed_models_as_files():
    assert list(report_of(INT8_FAILED)["files"]) == [FLOAT32_MODEL]
    assert list(report_of(PASSED)["files"]) == [FLOAT32_MODEL, INT8_MODEL]


# clothing10's export on an Intel Xeon with AMX: the mixed_16bit int8 file, 4x slower than float32.
SLOW_INT8 = {"tensorflow": {"batch1_p50_ms": 10.1, "batch32_images_per_s": 255.0},
             "onnx_float32": {"batch1_p50_ms": 1.50, "batch32_images_per_s": 668.7},
             "onnx_int8": {"batch1_p50_ms": 5.88, "batch32_images_per_s": 170.1},
             "openvino_int8": {"batch1_p50_ms": 1.40, "batch32_images_per_s": 900.0}}
FAST_INT8 = {**SLOW_INT8, "onnx_int8": {"batch1_p50_ms": 1.17, "batch32_images_per_s": 1128.7}}


def test_fastest_names_the_passed_file_onnxruntime_runs_fastest_at_each_batch_size():
    assert report_of(PASSED, latency=FAST_INT8)["fastest"] == {
        "batch1": {"file": INT8_MODEL, "p50_ms": 1.17},
        "batch32": {"file": INT8_MODEL, "images_per_s": 1128.7}}
    assert report_of(PASSED, latency=SLOW_INT8)["fastest"] == {
        "batch1": {"file": FLOAT32_MODEL, "p50_ms": 1.50},
        "batch32": {"file": FLOAT32_MODEL, "images_per_s": 668.7}}


def test_fastest_never_names_a_model_that_failed_its_gate():
    assert report_of(INT8_FAILED, latency=FAST_INT8)["fastest"]["batch1"]["file"] == FLOAT32_MODEL


def test_a_passed_int8_model_slower_than_float32_is_a_warning_naming_the_file_to_ship(caplog):
    report = {**report_of(PASSED, latency=SLOW_INT8), "quantization": {"recipe": "mixed_16bit"}}
    warn_if_int8_is_slower(report)
    assert caplog.messages == [
        "model.int8.onnx (int8 recipe mixed_16bit) is slower in onnxruntime on this CPU than "
        "model.onnx (batch1, batch32): ship that where speed matters, model.int8.onnx where size "
        "does; export_report.json: fastest"]
    caplog.clear()
    warn_if_int8_is_slower({**report_of(PASSED, latency=FAST_INT8), "quantization": {}})
    assert caplog.messages == []


def test_report_sizes_every_model_built_beside_the_runs_own():
    assert report_of(INT8_FAILED)["sizes_bytes"] == {
        "saved_model": 9000, "model.keras": 5000, FLOAT32_MODEL: 4000, INT8_MODEL: 1000}


def test_report_describes_the_run_from_its_record():
    report = report_of(PASSED)
    assert (report["run_id"], report["classes"], report["image_size"]) == (
        "run", ["NORMAL", "PNEUMONIA"], 32)
    assert report["decision_threshold"] == 0.4
    assert report["training_precision_policy"] == "float32"
    assert (report["run_uri"], report["export_uri"]) == ("/runs/run", "/exports/run")


def test_report_lists_the_gates_the_settings_ask_for_including_int8_when_it_is_off():
    settings = ExportConfig(run_uri="run", int8=False, int8_min_agreement=0.9,
                            int8_max_accuracy_drop=0.05)
    assert report_of(PASSED, settings)["gates"] == {
        "float32": {"max_abs_diff": 1e-4, "top1_agreement": 1.0},
        "int8": {"top1_agreement": 0.9, "max_accuracy_difference": 0.05}}


# --- The run record (read_run). ---


RECORD = run_record().as_dict()
OLD_METRICS = {  # a metrics.json written before the record existed
    "run_id": "old", "classes": ["NORMAL", "PNEUMONIA"], "precision_policy": "mixed_float16",
    "decision_threshold": 0.3,
    "config": {"image_size": 64, "backbone": "mobilenet_v2", "alpha": 0.5, "dense_units": 64,
               "dropout": 0.1, "seed": 7, "data_uri": "/data", "validation_split": 0.2,
               "test_split": 0.1}}


@pytest.fixture
def run_dir(tmp_path):
    """A complete run directory whose files are placeholders, but for labels.txt, listed in its
    MANIFEST.json."""
    run = tmp_path / "run"
    (run / "saved_model").mkdir(parents=True)
    for name in RUN_FILES:
        if name != "saved_model":
            (run / name).write_text("{}")
    (run / "labels.txt").write_text("NORMAL\nPNEUMONIA\n")
    write_manifest(run)
    return run


def with_metrics(run_dir, metrics) -> None:
    """Completes the run with this metrics.json (and a MANIFEST.json that lists it)."""
    text = metrics if isinstance(metrics, str) else json.dumps(metrics)
    (run_dir / "metrics.json").write_text(text)
    write_manifest(run_dir)


def test_read_run_returns_the_runs_record(run_dir):
    with_metrics(run_dir, {"record": RECORD, "classes": RECORD["classes"]})
    assert read_run(run_dir, "uri") == run_record()


def test_read_run_reads_a_run_written_before_the_record(run_dir):
    with_metrics(run_dir, OLD_METRICS)
    record = read_run(run_dir, "uri")
    assert (record.run_id, record.image_size, record.backbone, record.seed) == (
        "old", 64, "mobilenet_v2", 7)
    assert record.mixed_precision and record.decision_threshold == 0.3


@pytest.mark.parametrize("metrics", [
    "{not json",
    [],
    {"record": {**RECORD, "image_size": None}},
    {"record": {key: value for key, value in RECORD.items() if key != "backbone"}},
    {"run_id": "no config block"},
], ids=["not-json", "not-an-object", "null-field", "missing-field", "old-without-config"])
def test_read_run_names_metrics_json_on_one_line_when_it_holds_no_complete_record(
        run_dir, metrics):
    with_metrics(run_dir, metrics)
    with pytest.raises(BadInput) as raised:
        read_run(run_dir, "uri")
    message = str(raised.value)
    assert message.startswith(f"{run_dir / 'metrics.json'}: unreadable or incomplete (")
    assert "\n" not in message


def test_read_run_refuses_labels_that_disagree_with_the_record(run_dir):
    with_metrics(run_dir, {"record": {**RECORD, "classes": ["A", "B"]}})
    with pytest.raises(BadInput, match="labels.txt and metrics.json disagree on the classes"):
        read_run(run_dir, "uri")


def test_read_run_names_the_files_an_incomplete_run_lacks(run_dir):
    (run_dir / "model.keras").unlink()
    with pytest.raises(BadInput, match="RUN_URI=uri: the run lacks model.keras"):
        read_run(run_dir, "uri")


@pytest.mark.parametrize("damage, problem", [
    (lambda run: (run / "model.keras").write_text("[]"), "does not match its SHA-256"),
    (lambda run: (run / "model.keras").write_text("{"), "has 1 bytes, MANIFEST.json lists 2"),
    (lambda run: (run / "saved_model" / "saved_model.pb").unlink(), "is missing"),
], ids=["altered", "truncated", "missing"])
def test_read_run_names_the_file_that_does_not_match_manifest_json(run_dir, damage, problem):
    (run_dir / "saved_model" / "saved_model.pb").write_text("{}")
    with_metrics(run_dir, {"record": RECORD, "classes": RECORD["classes"]})
    damage(run_dir)
    with pytest.raises(BadInput) as raised:
        read_run(run_dir, "uri")
    assert str(raised.value).startswith("RUN_URI=uri: ") and problem in str(raised.value)
    assert ("model.keras" in str(raised.value)) != ("saved_model.pb" in str(raised.value))


def test_read_run_refuses_an_unreadable_manifest_json(run_dir):
    (run_dir / "MANIFEST.json").write_text("{not json")
    with pytest.raises(BadInput, match="RUN_URI=uri: MANIFEST.json is unreadable"):
        read_run(run_dir, "uri")


@pytest.mark.parametrize("report, accepted", [({"status": "passed"}, True),
                                              ({"run_fingerprint": "ab" * 32}, False)],
                         ids=["export-from-before", "export-of-now"])
def test_read_run_accepts_a_report_html_rewritten_only_by_an_export_from_before(
        run_dir, report, accepted):
    """Exports before export_report.html rewrote report.html in the run directory; any other
    file, and report.html beside an export that keeps the run's files, must match."""
    (run_dir / "report.html").write_text("<html>training</html>")
    with_metrics(run_dir, {"record": RECORD, "classes": RECORD["classes"]})
    (run_dir / "report.html").write_text("<html>exported</html>")  # same size
    (run_dir / "export_report.json").write_text(json.dumps(report))
    if accepted:
        assert read_run(run_dir, "uri") == run_record()
    else:
        with pytest.raises(BadInput, match="report.html does not match its SHA-256"):
            read_run(run_dir, "uri")
