"""Promotion (job/promotion/promote.py, job/promotion/versions.py): a run replaces the production model only when it
is no worse, on real X-rays (the `promotion_runs` fixture: three real runs promoted in turn)."""
import hashlib
import json
import shutil

import pytest

from common import run_files
from job.promotion import versions


def record(run_dir):
    return json.loads((run_dir / "promotion.json").read_text())


def test_the_first_run_is_promoted_with_no_champion(promotion_runs):
    verdict = record(promotion_runs["first"])
    assert verdict["promoted"] and verdict["champion"] is None
    assert "first run is promoted" in verdict["reason"]
    current = promotion_runs["current"]["first"]
    assert current["run_id"] == "first" and current["history"] == []


def test_a_good_second_run_is_promoted_after_a_paired_comparison(promotion_runs):
    verdict = record(promotion_runs["second"])
    assert verdict["promoted"], verdict["reason"]
    assert verdict["champion"]["run_id"] == "first"
    comparison = verdict["comparison"]
    assert comparison["images"] == 300
    assert 0 <= comparison["p_value"] <= 1
    current = promotion_runs["current"]["second"]
    assert current["run_id"] == "second" and current["history"][0]["run_id"] == "first"


def test_a_run_trained_on_swapped_labels_is_held_back_with_its_figures(promotion_runs):
    verdict = record(promotion_runs["swapped"])
    assert not verdict["promoted"] and verdict["status"] == "held_back"
    comparison = verdict["comparison"]
    assert comparison["difference"]["accuracy"] < -0.2
    assert comparison["p_value"] < 0.001
    assert comparison["only_champion_right"] > comparison["only_challenger_right"]
    assert comparison["interval"]["accuracy"][1] < 0
    assert set(verdict["per_class_recall"]["champion"]) == {"NORMAL", "PNEUMONIA"}
    assert "PROMOTE_MAX_DROP" in verdict["reason"]
    # CURRENT.json still names the second run, and the run is complete with its verdict listed.
    assert promotion_runs["current"]["swapped"]["run_id"] == "second"
    manifest = json.loads((promotion_runs["swapped"] / run_files.MANIFEST).read_text())["files"]
    assert manifest["promotion.json"]["sha256"] == run_files.sha256(
        promotion_runs["swapped"] / "promotion.json")
    assert "held back" in (promotion_runs["swapped"] / "report.html").read_text()


def test_a_promoted_version_is_complete_and_matches_its_pointer(promotion_runs):
    current = promotion_runs["current"]["second"]
    version = promotion_runs["promote_uri"] / "versions" / "second"
    for name, entry in current["files"].items():
        assert run_files.sha256(version / name) == entry["sha256"], name
    assert (version / "saved_model" / "saved_model.pb").is_file()
    assert not (promotion_runs["promote_uri"] / "versions" / "swapped").exists()


def test_a_promoted_versions_report_has_the_promotion_section_of_its_verdict(promotion_runs):
    page = (promotion_runs["promote_uri"] / "versions" / "second" / "report.html").read_text()
    section = page.split('<section id="promotion">')[1].split("</section>")[0]
    assert "No promotion" not in section
    assert 'Verdict: <span class="passed">promoted</span>' in section
    comparison = record(promotion_runs["second"])["comparison"]
    assert f"exact McNemar p = {comparison['p_value']:.4g}" in section
    assert "Recall per class" in section


# --- In-process: copies of the real runs promoted again, into copies or new PROMOTE_URIs. ---


def run_copy(promotion_runs, name, tmp_path, promote_uri, **settings):
    """A Config for promoting a copy of one of the runs (its verdict removed) into promote_uri."""
    from job.config import Config

    output = tmp_path / f"runs-{name}"
    shutil.copytree(promotion_runs[name], output / name, symlinks=True)
    (output / name / "promotion.json").unlink()
    (tmp_path / f"scratch-{name}").mkdir()
    return Config(data_uri=str(promotion_runs["data"][name]), output_uri=str(output), run_id=name,
                  cache_dir=tmp_path / f"cache-{name}", promote_uri=str(promote_uri),
                  **settings)


def copied_production(promotion_runs, tmp_path):
    production = tmp_path / "production"
    shutil.copytree(promotion_runs["promote_uri"], production)
    return production


def test_a_run_with_an_added_class_is_judged_by_the_floors_alone(promotion_runs, tmp_path):
    import dataclasses

    from job.promotion import promote

    production = copied_production(promotion_runs, tmp_path)
    config = run_copy(promotion_runs, "first", tmp_path, production)
    challenger = promote.load_challenger(config, None)
    added = dataclasses.replace(challenger, metrics={
        **challenger.metrics, "classes": [*challenger.classes, "COVID"]})
    current, _ = versions.read_current(str(production), 60)
    verdict = promote.judge(config, added, current, tmp_path / "scratch-first")
    assert verdict["promoted"] and "comparison" not in verdict
    assert "added ['COVID']" in verdict["reason"] and "only the floors" in verdict["reason"]
    strict = dataclasses.replace(config, promote_min_accuracy=0.99)
    verdict = promote.judge(strict, added, current, tmp_path / "scratch-first")
    assert not verdict["promoted"] and "PROMOTE_MIN_ACCURACY" in verdict["reason"]


def test_a_corrupted_champion_is_neither_trusted_nor_lost(promotion_runs, tmp_path):
    from job.promotion import promote

    production = copied_production(promotion_runs, tmp_path)
    weights = production / "versions" / "second" / "saved_model" / "variables" / \
        "variables.data-00000-of-00001"
    tampered = bytearray(weights.read_bytes())
    tampered[-1] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    pointer_before = (production / "CURRENT.json").read_bytes()
    config = run_copy(promotion_runs, "first", tmp_path, production)
    verdict = promote.promote_run(config, tmp_path / "scratch-first", None)
    assert not verdict["promoted"]
    assert "fails its SHA-256" in verdict["reason"] and "roll back" in verdict["reason"]
    assert (production / "CURRENT.json").read_bytes() == pointer_before
    assert weights.read_bytes() == bytes(tampered)  # kept as found, for whoever repairs it
    assert sorted(path.name for path in (production / "versions").iterdir()) == ["first", "second"]


def test_rollback_restores_the_previous_pointer(promotion_runs, tmp_path):
    production = copied_production(promotion_runs, tmp_path)
    assert versions.main(["rollback", str(production), "--cache-dir", str(tmp_path / "c")]) == 0
    current = json.loads((production / "CURRENT.json").read_text())
    assert current["run_id"] == "first" and current["history"] == []
    assert current["rolled_back_from"]["run_id"] == "second"
    assert current["files"] == promotion_runs["current"]["first"]["files"]
    assert (production / "versions" / "second" / "MANIFEST.json").is_file()  # never deleted
    assert versions.main(["rollback", str(production), "--cache-dir", str(tmp_path / "c")]) == 2


def test_two_promotions_racing_on_gcs_leave_one_consistent_pointer(promotion_runs, tmp_path,
                                                                  gcs_bucket, gcs_client):
    import threading

    from job.promotion import promote

    promote_uri = f"gs://{gcs_bucket}/production"
    configs = {name: run_copy(promotion_runs, name, tmp_path, promote_uri)
               for name in ("first", "second")}
    verdicts, start = {}, threading.Barrier(2)

    def promote_one(name):
        start.wait()
        verdicts[name] = promote.promote_run(configs[name], tmp_path / f"scratch-{name}", None)

    threads = [threading.Thread(target=promote_one, args=(name,)) for name in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bucket = gcs_client.bucket(gcs_bucket)
    current = json.loads(bucket.blob("production/CURRENT.json").download_as_bytes())
    # Exactly one run switched the empty pointer; the other compared again, with it.
    first_promoted = [name for name, verdict in verdicts.items() if verdict.get("champion") is None
                      and verdict["promoted"]]
    assert len(first_promoted) == 1
    other = ({"first", "second"} - set(first_promoted)).pop()
    assert verdicts[other]["champion"]["run_id"] == first_promoted[0]
    expected = other if verdicts[other]["promoted"] else first_promoted[0]
    assert current["run_id"] == expected
    if verdicts[other]["promoted"]:
        assert [entry["run_id"] for entry in current["history"]] == first_promoted
    manifest = json.loads(bucket.blob(f"production/versions/{expected}/MANIFEST.json")
                          .download_as_bytes())
    assert {name: entry["sha256"] for name, entry in current["files"].items()
            if name != "MANIFEST.json"} == {name: entry["sha256"]
                                            for name, entry in manifest["files"].items()}


def test_the_champion_is_scored_on_the_runs_decoded_images_without_decoding_them_again(
        promotion_runs, tmp_path):
    from job.promotion import promote

    production = copied_production(promotion_runs, tmp_path)
    config = run_copy(promotion_runs, "swapped", tmp_path, production)
    challenger = promote.load_challenger(config, None)
    copies = tmp_path / "images"
    copies.mkdir()
    paths = []
    for index, path in enumerate(challenger.paths):  # the run's images, as its cache decoded them
        paths.append(str(copies / f"{index}.png"))
        shutil.copy(path, paths[-1])
    copied = dataclasses_replace(challenger, paths=paths)
    scratch = tmp_path / "scratch-swapped"
    current, _ = versions.read_current(str(production), 60)
    champion_dir = production / current["version"]
    # Scored on images decoded now, which fills the cache as the run fills it (data.image_dataset).
    fresh = promote.score_champion(champion_dir, current, copied, scratch, 32)
    assert (scratch / "test").is_file()
    shutil.rmtree(copies)  # a second decode would fail now
    cached = promote.score_champion(champion_dir, current, copied, scratch, 32)
    assert len(cached) == 300
    assert (cached == fresh).all()


def dataclasses_replace(instance, **changes):
    import dataclasses

    return dataclasses.replace(instance, **changes)


def test_an_int8_file_that_failed_its_gate_is_held_back_and_float32_promoted(promotion_runs,
                                                                            tmp_path):
    from job.promotion import promote

    config = run_copy(promotion_runs, "first", tmp_path, tmp_path / "production")
    run_dir = tmp_path / "runs-first" / "first"
    (run_dir / "model.onnx").write_bytes(b"float32 model")
    (run_dir / "model.int8.onnx").write_bytes(b"stale int8 model from an earlier export")
    (run_dir / "selftest").mkdir()
    (run_dir / "selftest" / "inputs.npy").write_bytes(b"self-test inputs")
    (run_dir / "export_report.json").write_text(json.dumps({
        "status": "failed", "failed_gates": ["onnx_int8: top-1 agreement 0.95 < 0.99"],
        "files": {"model.onnx": {"bytes": 13}}}))
    verdict = promote.promote_run(config, tmp_path / "scratch-first", str(run_dir))
    assert verdict["promoted"] and verdict["onnx_float32"] == "passed"
    assert verdict["int8"] == "held back: onnx_int8: top-1 agreement 0.95 < 0.99"
    version = tmp_path / "production" / "versions" / "first"
    assert (version / "model.onnx").is_file() and (version / "selftest" / "inputs.npy").is_file()
    assert not (version / "model.int8.onnx").exists()
    current = json.loads((tmp_path / "production" / "CURRENT.json").read_text())
    assert "model.onnx" in current["files"] and "selftest/inputs.npy" in current["files"]


def test_a_promotion_stopped_before_its_switch_leaves_the_old_pointer_and_a_rerun_finishes_it(
        promotion_runs, tmp_path, monkeypatch):
    from job.promotion import pointer, promote

    production = copied_production(promotion_runs, tmp_path)
    shutil.rmtree(production / "versions" / "first")  # as if never promoted: written anew
    pointer_before = (production / "CURRENT.json").read_bytes()
    config = run_copy(promotion_runs, "first", tmp_path, production)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops where the switch would begin

    with monkeypatch.context() as patch:
        patch.setattr(pointer, "replace", stopped)
        with pytest.raises(KeyboardInterrupt):
            promote.promote_run(config, tmp_path / "scratch-first", None)
    assert (production / "CURRENT.json").read_bytes() == pointer_before
    assert (production / "versions" / "first" / "MANIFEST.json").is_file()  # written whole first
    verdict = promote.promote_run(config, tmp_path / "scratch-first", None)
    assert verdict["promoted"], verdict["reason"]
    current = json.loads((production / "CURRENT.json").read_text())
    assert current["run_id"] == "first"
    assert [entry["run_id"] for entry in current["history"]] == ["second", "first"]


def test_a_run_on_gcs_gets_its_verdict_beside_it_and_in_its_manifest(promotion_runs, tmp_path,
                                                                    gcs_bucket, gcs_client):
    import dataclasses

    import storage
    from job.promotion import promote

    config = run_copy(promotion_runs, "first", tmp_path, f"gs://{gcs_bucket}/production")
    storage.publish_tree(tmp_path / "runs-first" / "first", f"gs://{gcs_bucket}/runs/first",
                         last=run_files.MANIFEST)
    config = dataclasses.replace(config, output_uri=f"gs://{gcs_bucket}/runs")
    verdict = promote.promote_run(config, tmp_path / "scratch-first", None)
    assert verdict["promoted"] and verdict["champion"] is None
    bucket = gcs_client.bucket(gcs_bucket)
    stored = bucket.blob("runs/first/promotion.json").download_as_bytes()
    assert json.loads(stored)["status"] == "promoted"
    manifest = json.loads(bucket.blob("runs/first/MANIFEST.json").download_as_bytes())
    assert manifest["files"]["promotion.json"]["sha256"] == hashlib.sha256(stored).hexdigest()
    assert "Promotion" in bucket.blob("runs/first/report.html").download_as_text()
    assert bucket.blob("production/versions/first/MANIFEST.json").exists()


@pytest.mark.parametrize("failed, code", [("onnx_int8", 0), ("onnx_float32", 1)])
def test_with_export_onnx_a_failed_int8_gate_exits_0_promoted_and_a_failed_float32_gate_1_held_back(
        promotion_runs, tmp_path, monkeypatch, failed, code):
    """The job's own flow (python -m job's main) after a run whose export failed one gate."""
    import export.pipeline
    from export.errors import GateFailed
    from job import __main__ as entrypoint
    from job.training import setup, train

    config = run_copy(promotion_runs, "first", tmp_path, tmp_path / "production")
    run_dir = tmp_path / "runs-first" / "first"

    def export_failing(export_config):
        passed = {"onnx_int8": "model.onnx", "onnx_float32": "model.int8.onnx"}[failed]
        (run_dir / passed).write_bytes(b"a model that passed")
        (run_dir / "export_report.json").write_text(json.dumps({
            "status": "failed", "failed_gates": [f"{failed}: agreement 0.9 < 0.99"],
            "files": {passed: {"bytes": 19}}}))
        raise GateFailed(f"{failed}: agreement 0.9 < 0.99")

    monkeypatch.setattr(setup, "validate", lambda config, context: None)
    monkeypatch.setattr(train, "run", lambda config, context, stop: {"status": "trained"})
    monkeypatch.setattr(export.pipeline, "export_run", export_failing)
    environ = {"DATA_URI": config.data_uri, "OUTPUT_URI": config.output_uri, "RUN_ID": "first",
               "CACHE_DIR": str(config.cache_dir), "PROMOTE_URI": config.promote_uri,
               "EXPORT_ONNX": "1", "LOG_FORMAT": "text"}
    assert entrypoint.main(environ) == code
    verdict = record(run_dir)
    assert verdict["promoted"] == (code == 0)
    if code == 0:
        assert verdict["int8"].startswith("held back: onnx_int8")
    else:
        assert "float32 file failed its gate" in verdict["reason"]
        assert not (tmp_path / "production" / "CURRENT.json").exists()


def test_a_run_resumed_after_its_final_phase_is_compared_on_its_test_images(tmp_path):
    """SIGTERM while the run writes its files (every phase checkpointed): the rerun restores the
    final phase, scores it again and is promoted on its test images, calibrated as usual."""
    import signal

    from edge.exit_codes import EXIT_PREEMPTED
    from tests.conftest import run_in_process, start_job, tiny_vgg16_settings, write_class_images
    from tests.test_resume import stop_when_logged

    images = write_class_images(tmp_path / "images", ["a", "b"], per_class=40, size=32)
    settings = tiny_vgg16_settings(images, tmp_path / "out", tmp_path / "cache",
                                   FINE_TUNE_EPOCHS="1", PROMOTE_URI=str(tmp_path / "production"))
    process = start_job(settings, tmp_path / "first.log")
    stop_when_logged(process, tmp_path / "first.log", "weights digest:", signal.SIGTERM)
    assert process.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]

    rerun = run_in_process("job", settings)  # the stop needs a process; the rerun does not
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "phase 2: finished by an earlier attempt" in rerun.stderr
    run_dir = tmp_path / "out" / "tiny"
    verdict = record(run_dir)
    assert verdict["promoted"], verdict["reason"]
    assert verdict["challenger_figures"]["accuracy"] > 0.5  # two classes of unlike brightness
    predictions = json.loads((run_dir / "test_predictions.json").read_text())
    assert predictions["paths"] and len(predictions["paths"]) == len(predictions["labels"])
    calibration = json.loads((run_dir / "metrics.json").read_text())["calibration"]
    assert "earlier attempt" not in calibration.get("skipped", "")
    assert json.loads((tmp_path / "production" / "CURRENT.json").read_text())["run_id"] == "tiny"
