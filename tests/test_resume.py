"""Nothing lost: a run stopped by SIGTERM or killed outright resumes where it was, with the same RUN_ID."""
import json
import signal
import time

import pytest

from job.checkpoint import EXIT_PREEMPTED
from tests.conftest import run_job, start_job, tiny_vgg16_settings, write_class_images

FINE_TUNE_EPOCHS = 6


@pytest.fixture
def slow_run(tmp_path):
    """Settings for a run whose phase 2 epochs take about a second: the whole base trains uncached."""
    images = write_class_images(tmp_path / "images", ["a", "b"], per_class=30, size=48)
    return tiny_vgg16_settings(images, tmp_path / "out", tmp_path / "cache", IMAGE_SIZE="48",
                               FINE_TUNE_EPOCHS=str(FINE_TUNE_EPOCHS),
                               CACHE_FEATURES="0", PATIENCE="100", FINE_TUNE_FROM="block4_conv1")


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


def test_sigterm_in_phase_2_saves_and_the_restart_resumes_there(slow_run, tmp_path):
    log_path = tmp_path / "first.log"
    process = start_job(slow_run, log_path)
    sent = stop_when_logged(process, log_path, "phase 2 epoch 2/", signal.SIGTERM)
    assert process.wait(timeout=60) == EXIT_PREEMPTED
    assert time.monotonic() - sent < 30  # inside Kubernetes' default grace period
    first = log_path.read_text()
    assert "preempted: SIGTERM during epoch" in first and "rerun with RUN_ID=tiny" in first
    assert not (tmp_path / "out" / "tiny" / "WRITER.json").exists()  # its claim released

    second = run_job(slow_run)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "phase 1: finished by an earlier attempt" in second.stderr
    assert "phase 1: linear probe" not in second.stderr  # phase 1 is not redone, nor its features
    saved = int(first.split("SIGTERM during epoch ")[1].split(";")[0]) - 1
    assert f"phase 2: resuming at epoch {saved + 1} from the checkpoint" in second.stderr
    assert second.stderr.count("phase 2 epoch ") == FINE_TUNE_EPOCHS - saved

    metrics, run_dir = finished_metrics(slow_run)
    assert metrics["phase1"]["probe"]["C"] > 0  # phase 1's record, kept from the first attempt
    assert metrics["phase2"]["epochs_run"] == FINE_TUNE_EPOCHS
    assert len(metrics["phase2"]["history"]["val_loss"]) == FINE_TUNE_EPOCHS
    manifest = json.loads(open(f"{run_dir}/MANIFEST.json").read())["files"]
    assert {"metrics.json", "labels.txt", "saved_model/saved_model.pb"} <= set(manifest)
    assert not (tmp_path / "out" / "tiny" / "checkpoints").exists()  # cleared once complete


def test_sigkill_in_phase_2_resumes_from_the_last_completed_epoch(slow_run, tmp_path):
    log_path = tmp_path / "first.log"
    process = start_job(slow_run, log_path)
    stop_when_logged(process, log_path, "phase 2 epoch 3/", signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL

    second = run_job(slow_run)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed_at = int(second.stderr.split("phase 2: resuming at epoch ")[1].split()[0])
    assert resumed_at in (3, 4)  # the kill may land before or after epoch 3's checkpoint
    assert second.stderr.count("phase 2 epoch ") == FINE_TUNE_EPOCHS - resumed_at + 1
    metrics, _ = finished_metrics(slow_run)
    assert metrics["phase2"]["epochs_run"] == FINE_TUNE_EPOCHS


def test_a_new_run_id_starts_fresh(slow_run):
    first = run_job({**slow_run, "FINE_TUNE_EPOCHS": "0"})
    second = run_job({**slow_run, "FINE_TUNE_EPOCHS": "0", "RUN_ID": "other"})
    assert first.returncode == second.returncode == 0
    assert "finished by an earlier attempt" not in second.stderr
    assert "phase 1: linear probe on" in second.stderr
