"""Nothing lost: a run stopped by SIGTERM or killed outright resumes where it was, with the same
RUN_ID, and only on the data and settings it was started with (job/results/identity.py)."""
import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from edge.exit_codes import EXIT_BAD_INPUT, EXIT_PREEMPTED
from job.config import Config, ConfigError
from job.results import identity
from tests.conftest import run_in_process, start_job, tiny_vgg16_settings, write_class_images
from tests.test_nothing_lost import assert_one_line_exit
from tests.test_storage import tree_contents

# SIGTERM after epoch 1's line, SIGKILL after the next epoch's: an epoch left for either to land in
# late (in the epoch after the one expected) and the run still unfinished.
FINE_TUNE_EPOCHS = 4


def slow_settings(root: Path) -> dict:
    """Settings for a run whose phase 2 epochs take a second or more, long enough for a signal
    sent after an epoch's line to land in the next: the base runs uncached (CACHE_FEATURES=0) at
    48 px in every step, and block 5 trains."""
    images = write_class_images(root / "images", ["a", "b"], per_class=30, size=48)
    return tiny_vgg16_settings(images, root / "out", root / "cache", IMAGE_SIZE="48",
                               FINE_TUNE_EPOCHS=str(FINE_TUNE_EPOCHS),
                               CACHE_FEATURES="0", PATIENCE="100", FINE_TUNE_FROM="block5_conv1")


def stop_when_logged(process, log_path, line: str, sig: int, timeout: float = 300) -> float:
    """Sends sig once the job logs line; returns when it was sent."""
    deadline = time.monotonic() + timeout
    while line not in log_path.read_text():
        assert process.poll() is None, f"the job ended before {line!r}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {line!r} in time"
        time.sleep(0.1)
    process.send_signal(sig)
    return time.monotonic()


def finished_metrics(settings):
    run_dir = settings["OUTPUT_URI"] + "/" + settings["RUN_ID"]
    return json.loads(open(f"{run_dir}/metrics.json").read()), run_dir


def phase_2_epochs(log: str) -> list[int]:
    return [int(epoch) for epoch in re.findall(r"phase 2 epoch (\d+)/", log)]


def test_sigterm_in_phase_2_saves_and_the_restart_resumes_there(interrupted_run, killed_restart,
                                                                 resumed_run):
    """The restart is the process the SIGKILL test kills later; the run is finished after it."""
    first = interrupted_run["log"]
    assert interrupted_run["seconds_to_exit"] < 30  # inside Kubernetes' default grace period
    assert "preempted: SIGTERM during epoch" in first and "rerun with RUN_ID=tiny" in first
    run_uri = Path(interrupted_run["settings"]["OUTPUT_URI"], "tiny")
    assert not (run_uri / "WRITER.json").exists()  # its claim released

    restart = killed_restart["log"]
    assert "phase 1: finished by an earlier attempt" in restart
    assert "phase 1: linear probe" not in restart  # phase 1 is not redone, nor its features
    saved = interrupted_run["saved"]
    assert f"phase 2: resuming at epoch {saved + 1} from the checkpoint" in restart
    assert phase_2_epochs(restart)[0] == saved + 1

    settings, second = resumed_run
    assert second.returncode == 0, second.stderr[-3000:]
    assert "phase 1: finished by an earlier attempt" in second.stderr
    assert "phase 1: linear probe" not in second.stderr
    # Between them the restart and the last attempt trained each epoch after the saved ones,
    # none before (the killed epoch again, where its checkpoint was not written).
    assert set(phase_2_epochs(restart) + phase_2_epochs(second.stderr)) == \
        set(range(saved + 1, FINE_TUNE_EPOCHS + 1))

    metrics, run_dir = finished_metrics(settings)
    assert metrics["phase1"]["probe"]["C"] > 0  # phase 1's record, kept from the first attempt
    assert metrics["phase2"]["epochs_run"] == FINE_TUNE_EPOCHS
    assert len(metrics["phase2"]["history"]["val_loss"]) == FINE_TUNE_EPOCHS
    manifest = json.loads(open(f"{run_dir}/MANIFEST.json").read())["files"]
    assert {"metrics.json", "labels.txt", "saved_model/saved_model.pb"} <= set(manifest)
    assert not Path(run_dir, "checkpoints").exists()  # cleared once complete


def test_sigkill_in_phase_2_resumes_from_the_last_completed_epoch(killed_restart, resumed_run):
    """The restart of the interrupted run, killed once it logged an epoch, rerun to the end."""
    killed_after = killed_restart["killed_after_epoch"]
    settings, second = resumed_run
    assert second.returncode == 0, second.stderr[-3000:]
    resumed_at = int(second.stderr.split("phase 2: resuming at epoch ")[1].split()[0])
    # the kill may land before or after the checkpoint of the epoch it followed
    assert resumed_at in (killed_after, killed_after + 1)
    assert phase_2_epochs(second.stderr) == list(range(resumed_at, FINE_TUNE_EPOCHS + 1))
    metrics, _ = finished_metrics(settings)
    assert metrics["phase2"]["epochs_run"] == FINE_TUNE_EPOCHS


def test_a_new_run_id_starts_fresh(interrupted_run, tmp_path):
    """Beside a copy of the interrupted run and of its cache, whose checkpoints hold its finished
    phase 1 (a run that completed would have cleared them): another RUN_ID restores none of it."""
    settings = copy_of_run(interrupted_run["settings"], tmp_path)
    shutil.copytree(interrupted_run["settings"]["CACHE_DIR"], settings["CACHE_DIR"], symlinks=True)
    assert Path(settings["OUTPUT_URI"], "tiny", "checkpoints", "state.json").is_file()
    assert Path(settings["CACHE_DIR"], "checkpoints", "tiny", "state.json").is_file()
    second = run_in_process("job", {**settings, "FINE_TUNE_EPOCHS": "0", "RUN_ID": "other"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "finished by an earlier attempt" not in second.stderr
    assert "phase 1: linear probe on" in second.stderr


# --- a rerun of the RUN_ID on other data or settings is refused, complete or not ---

@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> dict:
    """A `python -m job` stopped by SIGTERM in phase 2 (exit 75), its checkpoints kept: its
    settings, its log, the seconds from the signal to its exit and the phase 2 epochs it saved."""
    root = tmp_path_factory.mktemp("interrupted")
    settings = slow_settings(root)
    process = start_job(settings, root / "first.log")
    sent = stop_when_logged(process, root / "first.log", "phase 2 epoch 1/", signal.SIGTERM)
    assert process.wait(timeout=60) == EXIT_PREEMPTED
    log = (root / "first.log").read_text()
    return {"settings": settings, "log": log, "seconds_to_exit": time.monotonic() - sent,
            "saved": int(log.split("SIGTERM during epoch ")[1].split(";")[0]) - 1}


def copy_of_run(settings: dict, root: Path) -> dict:
    """Settings for a copy of a run's output folder (its checkpoints too) under root, with a new
    cache: each test changes its own copy."""
    shutil.copytree(settings["OUTPUT_URI"], root / "out", symlinks=True)
    return {**settings, "OUTPUT_URI": str(root / "out"), "CACHE_DIR": str(root / "cache")}


@pytest.fixture(scope="module")
def killed_restart(interrupted_run, tmp_path_factory) -> dict:
    """A copy of the interrupted run restarted as a process, killed by SIGKILL once it logged the
    first epoch it trained: its settings, its log and that epoch."""
    root = tmp_path_factory.mktemp("restarted")
    settings = copy_of_run(interrupted_run["settings"], root)
    epoch = interrupted_run["saved"] + 1
    process = start_job(settings, root / "restart.log")
    stop_when_logged(process, root / "restart.log", f"phase 2 epoch {epoch}/", signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    return {"settings": settings, "log": (root / "restart.log").read_text(),
            "killed_after_epoch": epoch}


@pytest.fixture(scope="module")
def resumed_run(killed_restart) -> tuple[dict, object]:
    """The killed restart's run rerun, in this process, with its own data and settings, to the
    end: (settings, result)."""
    settings = killed_restart["settings"]
    return settings, run_in_process("job", settings)


def other_images(root: Path) -> Path:
    return write_class_images(root / "other", ["a", "b"], per_class=30, size=48, seed=1)


def test_an_unfinished_run_rerun_on_other_data_exits_2_naming_data_uri_and_restores_nothing(
        interrupted_run, tmp_path):
    settings = copy_of_run(interrupted_run["settings"], tmp_path)
    checkpoints = Path(settings["OUTPUT_URI"], "tiny", "checkpoints")
    before = tree_contents(checkpoints)
    other = other_images(tmp_path)
    started = time.monotonic()
    result = run_in_process("job", {**settings, "DATA_URI": str(other)})
    print(f"refused in {time.monotonic() - started:.1f} s")
    assert_one_line_exit(result, EXIT_BAD_INPUT, "RUN_ID=tiny: its checkpoints",
                         f"recorded DATA_URI={settings['DATA_URI']} (60 files",
                         f"this attempt has DATA_URI={other} (60 files")
    assert "finished by an earlier attempt" not in result.stderr
    assert tree_contents(checkpoints) == before


def test_an_unfinished_run_rerun_with_its_identity_resumes_and_records_it(resumed_run):
    settings, result = resumed_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phase 1: finished by an earlier attempt" in result.stderr
    assert "phase 2: resuming at epoch" in result.stderr
    assert "record no data or settings" not in result.stderr
    metrics, _ = finished_metrics(settings)
    assert metrics[identity.KEY]["data_uri"] == settings["DATA_URI"]
    assert metrics[identity.KEY]["data_files"] == 60
    assert metrics[identity.KEY]["image_size"] == 48


def test_a_complete_run_rerun_on_other_data_exits_2_and_is_left_as_it_was(resumed_run, tmp_path):
    settings, _ = resumed_run
    run_dir = Path(settings["OUTPUT_URI"], "tiny")
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    other = other_images(tmp_path)
    started = time.monotonic()
    result = run_in_process("job", {**settings, "DATA_URI": str(other), "WEIGHTS": "none"})
    print(f"refused in {time.monotonic() - started:.1f} s")
    assert_one_line_exit(result, EXIT_BAD_INPUT, f"RUN_ID=tiny: its run at {run_dir}",
                         f"this attempt has DATA_URI={other} (60 files", "WEIGHTS=none")
    assert "already complete" not in result.stderr
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before


@pytest.mark.parametrize("complete", [False, True], ids=["checkpointed", "complete"])
@pytest.mark.parametrize("change", [{"BACKBONE": "mobilenet_v2"}, {"WEIGHTS": "none"},
                                    {"IMAGE_SIZE": "64"}], ids=lambda change: next(iter(change)))
def test_a_run_rerun_with_another_backbone_weights_or_image_size_is_refused_naming_it(
        complete, change, interrupted_run, resumed_run):
    """In-process, against the records of the real runs above: the refusal comes before anything
    is read or built."""
    settings = resumed_run[0] if complete else interrupted_run["settings"]
    name = next(iter(change))
    with pytest.raises(ConfigError, match=f"{name}=.*; this attempt has {name}={change[name]}"):
        identity.check_rerun(Config.from_env({**settings, **change}))
