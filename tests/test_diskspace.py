"""A full disk: checked before the large writes (h5py crashes the process on one), and ended with
one line naming the path and the space, exit 2, wherever it is met."""
import errno

import keras
import numpy as np
import pytest
import tensorflow as tf

import storage
from export.errors import ExportError
from job.training.checkpoint import Checkpoints, StopSignal
from storage import diskspace
from tests.conftest import run_job, tiny_vgg16_settings, write_class_images


def test_a_write_larger_than_the_free_space_is_refused_before_it_starts(tmp_path):
    free = diskspace.free_bytes(tmp_path)
    with pytest.raises(diskspace.DiskFull) as refused:
        diskspace.require(tmp_path / "not-yet" / "weights.h5", free + 1, "the weights")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path}/not-yet/weights.h5: disk full: needs about ")
    assert "for the weights" in message and " free; free space on that volume" in message
    assert "\n" not in message
    diskspace.require(tmp_path, 1000, "a small file")  # room for it: no error


def test_an_oserror_of_a_full_disk_names_its_file(tmp_path):
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.weights.h5"))
    full = diskspace.from_error(error)
    assert full.path == str(tmp_path / "x.weights.h5") and full.free > 0
    assert "x.weights.h5: disk full: no space left" in str(full)
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")  # no file named: the given place
    assert diskspace.from_error(quota, where=tmp_path).path == str(tmp_path)


def test_tensorflows_error_of_a_full_disk_names_the_file_without_its_temporary_suffix():
    error = tf.errors.ResourceExhaustedError(None, None, (
        "{{function_node __wrapped__IteratorGetNext}} /cache/scratch/run/train_0.data-00000-of-"
        "00001.tempstate2892490088609494314; No space left on device [Op:IteratorGetNext] name: "))
    assert diskspace.from_error(error).path == "/cache/scratch/run/train_0.data-00000-of-00001"


def test_a_full_disk_is_found_under_the_error_a_library_made_of_it():
    with pytest.raises(ExportError) as raised:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise ExportError(f"int8 quantization failed: {error}") from None
    assert diskspace.from_error(raised.value, where="/cache") is not None


@pytest.mark.parametrize("error", [
    tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,512]"),
    OSError(errno.EACCES, "Permission denied", "/cache/x"),
    ValueError("no space in this name")])
def test_other_errors_are_not_taken_for_a_full_disk(error):
    assert diskspace.from_error(error) is None


@pytest.fixture(scope="module")
def trained_model():
    model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(200, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(np.zeros((4, 30)), np.zeros(4), verbose=0)  # the optimizer's slots exist
    return model


def test_the_estimates_cover_what_keras_writes(trained_model, tmp_path):
    trained_model.save_weights(tmp_path / "w.weights.h5")
    weights = (tmp_path / "w.weights.h5").stat().st_size
    assert weights <= diskspace.weights_file_bytes(trained_model) < 2 * weights + 2**20
    trained_model.export(str(tmp_path / "saved_model"), verbose=False)
    trained_model.save(tmp_path / "model.keras")
    written = (sum(p.stat().st_size for p in (tmp_path / "saved_model").rglob("*") if p.is_file())
               + (tmp_path / "model.keras").stat().st_size)
    assert written <= diskspace.model_files_bytes(trained_model) + diskspace.SLACK_BYTES


def test_a_phase_whose_weights_do_not_fit_leaves_no_file(trained_model, tmp_path, monkeypatch):
    checkpoints = Checkpoints(tmp_path / "ckpt", str(tmp_path / "ckpt-uri"), "run", StopSignal())
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 100_000)  # a nearly full volume
    with pytest.raises(diskspace.DiskFull, match="for phase 1's weights"):
        checkpoints.finish("phase 1", trained_model, {"epochs_run": 1})
    assert not list((tmp_path / "ckpt").glob("*.h5")) and checkpoints.finished("phase 1") is None


def test_the_job_on_a_full_disk_ends_with_one_line_and_exit_2(small_tmpfs, tmp_path):
    """CACHE_DIR on a 50 MB tmpfs: VGG16's phase-1 weights (59 MB) do not fit. Before the check
    h5py crashed the process (exit 139) half-way through the file."""
    images = write_class_images(tmp_path / "images", ["a", "b"], per_class=8)
    result = run_job(tiny_vgg16_settings(images, tmp_path / "out", small_tmpfs / "cache",
                                         FINE_TUNE_EPOCHS="0"))
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"{small_tmpfs}/cache/checkpoints/tiny: disk full: needs about " in errors[0]
    assert "for phase 1's weights" in errors[0] and "rerun with RUN_ID=tiny" in errors[0]
    assert not list((small_tmpfs / "cache").rglob("*.h5"))


def test_a_pull_that_would_not_fit_is_refused_before_any_download(gcs_client, gcs_bucket,
                                                                   tmp_path, monkeypatch):
    gcs_client.bucket(gcs_bucket).blob("data/a/x.jpeg").upload_from_string(b"x" * 200_000)
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 100_000)
    with pytest.raises(diskspace.DiskFull, match="for the next 1 objects of gs://"):
        storage.pull_tree(f"gs://{gcs_bucket}/data", tmp_path / "data")
    assert not [path for path in (tmp_path / "data").rglob("*") if path.is_file()]


def test_a_download_that_fills_the_disk_ends_as_a_full_disk_not_a_storage_error(
        gcs_client, gcs_bucket, small_tmpfs, monkeypatch):
    gcs_client.bucket(gcs_bucket).blob("data/a/x.jpeg").upload_from_string(b"x" * 60_000_000)
    monkeypatch.setattr(diskspace, "require", lambda *args: None)  # as if the estimate were short
    with pytest.raises(diskspace.DiskFull, match=f"{small_tmpfs}/data/a/x.jpeg.* disk full"):
        storage.pull_tree(f"gs://{gcs_bucket}/data", small_tmpfs / "data")
