"""Vertex AI hyperparameter tuning trials: each trial's own run, and the figure it reports
through cloudml-hypertune (job/results/tuning.py), the same as metrics.json records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from job.config import Config, ConfigError
from job.results import tuning
from tests.conftest import tiny_vgg16_settings, write_class_images

BASE = {"DATA_URI": "gs://data/flowers", "OUTPUT_URI": "gs://models/tuning", "RUN_ID": "tune-001"}


def trial(trial_id: str, **env) -> Config:
    """A trial's settings as Vertex AI gives them: the job's environment, the trial's id, and
    its AIP_* folders under the tuning job's baseOutputDirectory/<trial id>/."""
    base = f"gs://models/vertex/tune-001/{trial_id}"
    return Config.from_env({**BASE, "CLOUD_ML_TRIAL_ID": trial_id,
                            "AIP_MODEL_DIR": f"{base}/model/",
                            "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/", **env})


def read_metric_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_trials_of_one_tuning_job_write_to_different_places():
    first, second = trial("1"), trial("2")
    assert (first.run_id, second.run_id) == ("tune-001-trial-1", "tune-001-trial-2")
    assert first.run_uri == "gs://models/tuning/tune-001-trial-1"
    for place in ("run_uri", "checkpoint_uri", "model_uri"):
        assert getattr(first, place) != getattr(second, place), place
    # A CHECKPOINT_URI the trials share still holds one prefix per trial's run.
    shared = [trial(n, CHECKPOINT_URI="gs://models/ckpt").checkpoint_uri for n in ("1", "2")]
    assert shared == ["gs://models/ckpt/tune-001-trial-1", "gs://models/ckpt/tune-001-trial-2"]


def test_a_restarted_trial_has_the_same_run_as_before():
    assert trial("3").run_uri == trial("3").run_uri
    assert trial("3").checkpoint_uri == trial("3").checkpoint_uri


def test_a_trial_without_run_id_exits_2_naming_both_variables(main_in_process):
    result = main_in_process("job", {"DATA_URI": "/data", "CLOUD_ML_TRIAL_ID": "4"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "CLOUD_ML_TRIAL_ID=4" in line and "needs RUN_ID" in line


def test_a_trial_that_would_promote_itself_is_refused():
    with pytest.raises(ConfigError, match="PROMOTE_URI is set in a tuning trial"):
        trial("1", PROMOTE_URI="gs://models/production")


@pytest.mark.parametrize("name, value", [("TUNING_METRIC", "loss"), ("TUNING_METRIC", "test_accuracy"),
                                         ("CLOUD_ML_TRIAL_ID", "../1"),
                                         ("CLOUD_ML_HP_METRIC_FILE", "gs://b/metrics")])
def test_a_bad_tuning_setting_is_refused_naming_it(name, value):
    with pytest.raises(ConfigError, match=name):
        trial("1", **{name: value})


def test_outside_a_trial_nothing_is_reported_or_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "library-default.metrics"))
    reporter = tuning.Reporter(Config.from_env(BASE), chief=True)
    reporter.report("phase1", {"validation": {"accuracy": 0.5}})
    assert reporter.record() is None and not list(tmp_path.iterdir())


def test_the_chief_reports_json_lines_as_hypertune_writes_them(tmp_path):
    config = trial("7", CLOUD_ML_HP_METRIC_FILE=str(tmp_path / "hp" / "output.metrics"),
                   TUNING_METRIC="macro_recall")
    reporter = tuning.Reporter(config, chief=True)
    reporter.report("phase1", {"validation": {"macro_recall": 0.625}})
    reporter.report(tuning.FINAL, {"validation": {"macro_recall": 0.75}})
    lines = read_metric_lines(tmp_path / "hp" / "output.metrics")
    assert [(line["validation_macro_recall"], line["global_step"], line["trial"]) for line in lines] \
        == [("0.625", "1", "7"), ("0.75", "2", "7")]
    assert reporter.record() == {
        "metric": "validation_macro_recall", "trial_id": "7", "value": 0.75,
        "reports": [{"phase": "phase1", "global_step": 1, "value": 0.625},
                    {"phase": "final", "global_step": 2, "value": 0.75}]}


def test_a_worker_records_the_figures_but_writes_no_metric_file(tmp_path):
    config = trial("7", CLOUD_ML_HP_METRIC_FILE=str(tmp_path / "output.metrics"))
    reporter = tuning.Reporter(config, chief=False)
    reporter.report(tuning.FINAL, {"validation": {"accuracy": 0.5}})
    assert reporter.record()["value"] == 0.5 and not (tmp_path / "output.metrics").exists()


def test_a_trial_without_validation_images_fails_naming_tuning_metric(tmp_path):
    config = trial("7", CLOUD_ML_HP_METRIC_FILE=str(tmp_path / "output.metrics"))
    with pytest.raises(ConfigError, match="TUNING_METRIC=accuracy: the validation split has no images"):
        tuning.Reporter(config, chief=True).report("phase1", {"validation": None})


def test_the_tuned_fine_tune_from_values_are_layers_of_vgg16(repo_root):
    import yaml

    from job.training import model

    spec = yaml.safe_load((repo_root / "infra" / "vertex" / "hptuningjob.yaml").read_text())
    (choice,) = [p for p in spec["studySpec"]["parameters"] if p["parameterId"] == "fine_tune_from"]
    layers = model.base_layer_names("vgg16", 1.0, 150)
    assert set(choice["categoricalValueSpec"]["values"]) <= set(layers)


# --- One real trial: a tiny VGG16 run in this process, then the same trial restarted. ---


@pytest.fixture(scope="module")
def trial_run(tmp_path_factory):
    """Trial 7 of tuning job "tune" trained and published in-process, its parameter given as
    Vertex AI gives it, a flag (--fine_tune_learning_rate=2e-5), the rest from the environment."""
    from job.cluster.context import RunContext
    from job.training import train

    root = tmp_path_factory.mktemp("trial")
    images = write_class_images(root / "images", ["cat", "dog"], per_class=14)
    metric_file = root / "hypertune" / "output.metrics"
    env = tiny_vgg16_settings(images, root / "out", root / "cache", RUN_ID="tune",
                              CLOUD_ML_TRIAL_ID="7", CLOUD_ML_HP_METRIC_FILE=str(metric_file))
    config = Config.from_env(env, ["--fine_tune_learning_rate=2e-5"])
    train.run(config, RunContext.create(config))
    run_dir = root / "out" / "tune-trial-7"
    return {"config": config, "run_dir": run_dir, "metric_file": metric_file,
            "metrics": json.loads((run_dir / "metrics.json").read_text())}


@pytest.mark.slow  # trial_run trains a tiny VGG16 in this process
def test_a_trial_reports_each_phase_and_the_final_figure_that_metrics_json_records(trial_run):
    metrics = trial_run["metrics"]
    lines = read_metric_lines(trial_run["metric_file"])
    assert [line["global_step"] for line in lines] == ["1", "2", "3"]
    assert {line["trial"] for line in lines} == {"7"}
    reported = [float(line["validation_accuracy"]) for line in lines]
    recorded = metrics[tuning.KEY]
    assert [r["phase"] for r in recorded["reports"]] == ["phase1", "phase2", "final"]
    assert [r["value"] for r in recorded["reports"]] == reported
    assert recorded["value"] == reported[-1] == metrics["validation"]["accuracy"]
    assert recorded["metric"] == "validation_accuracy" and recorded["trial_id"] == "7"
    assert metrics["phase1"]["validation"]["accuracy"] == reported[0]
    assert metrics["run_id"] == "tune-trial-7"
    assert metrics["config"]["fine_tune_learning_rate"] == 2e-5


@pytest.mark.slow  # trial_run trains a tiny VGG16 in this process
def test_a_trial_restarted_after_its_run_completed_reports_the_recorded_figure(trial_run):
    from job.cluster.context import RunContext
    from job.training import train

    trial_run["metric_file"].unlink()  # the restarted trial is on a new machine
    config = trial_run["config"]
    assert train.run(config, RunContext.create(config))["status"] == train.ALREADY_COMPLETE
    (line,) = read_metric_lines(trial_run["metric_file"])
    assert float(line["validation_accuracy"]) == trial_run["metrics"][tuning.KEY]["value"]
