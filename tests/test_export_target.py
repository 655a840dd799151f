"""The export's target: a re-export replaces a passed export only when it passes, an export never
writes into another run's directory, and a run whose files do not match MANIFEST.json is refused."""
from __future__ import annotations

import json
import shutil

import pytest

from common.run_files import sha256, write_manifest
from export import target as export_target
from export.errors import BadInput
from storage import join, objects
from tests.conftest import EXPORT_FILES, checksums, export_in_process, manifest_mismatches

# A re-export whose float32 gate is made to fail (float32_gate_that_fails), on fewer images, as
# its verdict does not depend on them, and without int8: what it must leave is the passed export,
# int8 model included, whichever gate fails (building both int8 recipes took two thirds of it).
GATE_FAILS = {"INT8": "0", "PARITY_IMAGES": "60", "LATENCY_RUNS": "1"}
# A re-export that passes, as cheaply: what it replaces is checked, not how close int8 comes.
CHEAP_PASS = {"CALIBRATION_IMAGES": "8", "PARITY_IMAGES": "60", "LATENCY_RUNS": "1",
              "INT8_MIN_AGREEMENT": "0.5", "INT8_MAX_ACCURACY_DROP": "0.5"}


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_export_into_the_run_directory_changes_no_file_its_manifest_lists(mobilenet_export,
                                                                             mobilenet_run):
    assert mobilenet_export[0] == 0, mobilenet_export[2][-2000:]
    assert manifest_mismatches(mobilenet_run) == []
    page = (mobilenet_run / "export_report.html").read_text()  # the page with the export's section
    assert "onnx_int8" in page and "onnx_int8" not in (mobilenet_run / "report.html").read_text()


def test_a_reexport_whose_gate_fails_leaves_the_passed_export_in_the_run_directory(
        exported_run_copy, float32_gate_that_fails, tmp_path):
    before = checksums(exported_run_copy)
    code = export_in_process(exported_run_copy, tmp_path / "cache", **GATE_FAILS)
    assert code == 1  # the gate failed
    after = checksums(exported_run_copy)
    assert {name: after.get(name) for name in before} == before  # nothing changed or went
    assert set(after) - set(before) == {"export_report.failed.json"}
    failed = json.loads((exported_run_copy / "export_report.failed.json").read_text())
    assert failed["status"] == "failed" and failed["failed_gates"][0].startswith("float32:")
    assert json.loads((exported_run_copy / "export_report.json").read_text())["status"] == "passed"


def test_a_reexport_whose_gate_fails_leaves_the_passed_export_at_export_uri(
        mobilenet_export, mobilenet_run, float32_gate_that_fails, tmp_path):
    target = tmp_path / "edge"
    target.mkdir()
    for name in EXPORT_FILES:  # the export that passed, as an earlier export to target left it
        if (mobilenet_run / name).exists():
            shutil.copy2(mobilenet_run / name, target / name)
    before = checksums(target)
    code = export_in_process(mobilenet_run, tmp_path / "cache", EXPORT_URI=str(target),
                             **GATE_FAILS)
    assert code == 1
    after = checksums(target)
    assert {name: after.get(name) for name in before} == before
    assert json.loads((target / "export_report.failed.json").read_text())["status"] == "failed"
    assert manifest_mismatches(mobilenet_run) == []


def test_a_reexport_into_the_run_directory_that_passes_replaces_the_export(exported_run_copy,
                                                                           tmp_path):
    previous = json.loads((exported_run_copy / "export_report.json").read_text())
    (exported_run_copy / "export_report.failed.json").write_text(
        json.dumps({**previous, "status": "failed"}))  # an earlier attempt's, now outdated
    code = export_in_process(exported_run_copy, tmp_path / "cache", **CHEAP_PASS)
    assert code == 0
    report = json.loads((exported_run_copy / "export_report.json").read_text())
    assert report["status"] == "passed" and report["created_utc"] >= previous["created_utc"]
    assert set(report["files"]) == {"model.onnx", "model.int8.onnx"}
    for name, file in report["files"].items():  # the report describes the files that are there
        path = exported_run_copy / name
        assert (path.stat().st_size, sha256(path)) == (file["bytes"], file["sha256"])
    assert not (exported_run_copy / "export_report.failed.json").exists()
    assert manifest_mismatches(exported_run_copy) == []


def other_run(run_dir, folder):
    """A complete run of another id in folder: run_dir's files, metrics.json renamed, its own
    MANIFEST.json; without run_dir's export."""
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns(*EXPORT_FILES[:2],
                                                                   "export_report.*"))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["run_id"] = metrics["record"]["run_id"] = "another-run"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    write_manifest(folder)
    return folder


def others_export(run_dir, folder):
    """A folder holding the export of another run (its report names another run id)."""
    folder.mkdir()
    for name in EXPORT_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, folder / name)
    report = json.loads((folder / "export_report.json").read_text())
    report.update(run_id="another-run", run_uri="/elsewhere/another-run",
                  run_fingerprint="0" * 64)
    (folder / "export_report.json").write_text(json.dumps(report))
    return folder


@pytest.mark.parametrize("holding, named", [(other_run, "MANIFEST.json"),
                                            (others_export, "export_report.json")],
                         ids=["another-run", "another-runs-export"])
def test_an_export_into_a_folder_of_another_run_exits_2_and_changes_nothing(
        holding, named, mobilenet_export, mobilenet_run, tmp_path, capsys):
    target = holding(mobilenet_run, tmp_path / "target")
    before = checksums(target)
    code = export_in_process(mobilenet_run, tmp_path / "cache", EXPORT_URI=str(target))
    assert code == 2
    line = last_line(capsys)
    assert f"EXPORT_URI={target}" in line and named in line and "another-run" in line
    assert checksums(target) == before


def truncate_variables(run_dir):
    data = next((run_dir / "saved_model" / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    return data


def flip_model_keras(run_dir):
    path = run_dir / "model.keras"
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 4096] = bytes(255 - b for b in content[middle:middle + 4096])
    path.write_bytes(bytes(content))
    return path


def remove_predictions(run_dir):
    (run_dir / "test_predictions.json").unlink()
    return run_dir / "test_predictions.json"


@pytest.mark.parametrize("damage", [truncate_variables, flip_model_keras, remove_predictions],
                         ids=["truncated-variables", "flipped-model-keras", "missing-file"])
def test_a_run_whose_file_does_not_match_its_manifest_exits_2_naming_the_file(
        damage, exported_run_copy, tmp_path, capsys):
    damaged = damage(exported_run_copy).relative_to(exported_run_copy).as_posix()
    before = checksums(exported_run_copy)
    code = export_in_process(exported_run_copy, tmp_path / "cache")
    assert code == 2
    output = capsys.readouterr().err
    line = output.strip().splitlines()[-1]
    assert damaged in line and "MANIFEST.json" in line and "Traceback" not in output
    assert checksums(exported_run_copy) == before


# --- export.target on its own: staged files published to a local folder or a gs:// prefix. ---

@pytest.fixture(params=["local", "gs"])
def target_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "target")
    return f"gs://{request.getfixturevalue('gcs_bucket')}/edge/run"


@pytest.fixture
def small_run(tmp_path):
    """A run directory of placeholders with its MANIFEST.json, and who it is."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "labels.txt").write_text("a\nb\n")
    write_manifest(run)
    return run, export_target.Run(sha256(run / "MANIFEST.json"), "run", str(run))


def stage(folder, run, status: str, models: dict[str, str]) -> list[str]:
    """Stages an export of run whose report has status and lists models (name: content)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in models.items():
        (folder / name).write_text(content)
    (folder / "labels.txt").write_text("a\nb\n")
    (folder / export_target.PAGE).write_text(f"<html>{status}</html>")
    report = {"status": status, "run_id": run.run_id, "run_uri": run.run_uri,
              "run_fingerprint": run.fingerprint,
              "files": {name: {"bytes": len(content), "sha256": sha256(folder / name)}
                        for name, content in models.items()}}
    (folder / export_target.EXPORT_REPORT).write_text(json.dumps(report))
    return [*models, "labels.txt", export_target.PAGE, export_target.EXPORT_REPORT]


def publish(tmp_path, uri, small_run, name, status, models):
    run_dir, run = small_run
    names = stage(tmp_path / name, run, status, models)
    target = export_target.inspect(uri, "EXPORT_URI", run_dir, run)
    return export_target.publish(tmp_path / name, names, target, passed=status == "passed")


def read_report(uri, name=export_target.EXPORT_REPORT) -> dict:
    return json.loads(objects.read(join(uri, name)))


def test_a_failed_export_beside_a_passed_one_writes_only_its_failed_report(target_uri, small_run,
                                                                            tmp_path):
    publish(tmp_path, target_uri, small_run, "first", "passed", {"model.onnx": "1", "m8.onnx": "2"})
    assert publish(tmp_path, target_uri, small_run, "second", "failed",
                   {"model.onnx": "3"}) == export_target.FAILED_REPORT
    assert read_report(target_uri)["status"] == "passed"
    assert read_report(target_uri, export_target.FAILED_REPORT)["status"] == "failed"
    assert [objects.read(join(target_uri, name)) for name in ("model.onnx", "m8.onnx")] == [
        b"1", b"2"]
    assert objects.read(join(target_uri, export_target.PAGE)) == b"<html>passed</html>"


def test_a_passed_export_replaces_the_previous_one_and_deletes_what_it_no_longer_lists(
        target_uri, small_run, tmp_path):
    publish(tmp_path, target_uri, small_run, "first", "passed", {"model.onnx": "1", "m8.onnx": "2"})
    publish(tmp_path, target_uri, small_run, "second", "failed", {"model.onnx": "3"})
    assert publish(tmp_path, target_uri, small_run, "third", "passed",
                   {"model.onnx": "4"}) == export_target.EXPORT_REPORT
    assert read_report(target_uri)["files"] == {"model.onnx": {"bytes": 1,
                                                               "sha256": sha256(tmp_path / "third" / "model.onnx")}}
    assert objects.read(join(target_uri, "model.onnx")) == b"4"
    assert objects.read(join(target_uri, "m8.onnx")) is None  # listed by the report it replaced
    assert objects.read(join(target_uri, export_target.FAILED_REPORT)) is None


def test_a_previous_exports_file_changed_since_is_not_deleted(target_uri, small_run, tmp_path):
    publish(tmp_path, target_uri, small_run, "first", "passed", {"model.onnx": "1", "m8.onnx": "2"})
    (tmp_path / "someone").write_text("not the export's")
    objects.put(tmp_path / "someone", join(target_uri, "m8.onnx"))
    publish(tmp_path, target_uri, small_run, "second", "passed", {"model.onnx": "3"})
    assert objects.read(join(target_uri, "m8.onnx")) == b"not the export's"


def test_in_the_run_directory_no_file_its_manifest_lists_is_written(small_run, tmp_path):
    run_dir, run = small_run
    names = stage(tmp_path / "staged", run, "passed", {"model.onnx": "1"})
    (tmp_path / "staged" / "labels.txt").write_text("other\n")
    target = export_target.inspect(str(run_dir), "RUN_URI", run_dir, run)
    export_target.publish(tmp_path / "staged", names, target, passed=True)
    assert (run_dir / "labels.txt").read_text() == "a\nb\n" and (run_dir / "model.onnx").exists()


def test_a_report_of_another_run_is_refused_naming_it(target_uri, small_run, tmp_path):
    publish(tmp_path, target_uri, small_run, "first", "passed", {"model.onnx": "1"})
    run_dir, run = small_run
    other = export_target.Run("0" * 64, "other", "/elsewhere")
    with pytest.raises(BadInput, match=r"holds export_report.json of another run \('run' at "):
        export_target.inspect(target_uri, "EXPORT_URI", run_dir, other)


def test_a_folder_with_a_runs_metrics_json_and_no_manifest_is_refused_naming_the_run(small_run,
                                                                                     tmp_path):
    folder = tmp_path / "training-now"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"run_id": "training-now"}))
    with pytest.raises(BadInput, match=r"holds metrics.json \(run 'training-now'\) and no "
                                       r"MANIFEST.json"):
        export_target.inspect(str(folder), "EXPORT_URI", *small_run)
    assert [path.name for path in folder.iterdir()] == ["metrics.json"]
