"""Nothing lost: the job deletes only what it wrote, refuses places that overlap, skips object names
it cannot store, and neither a dead endpoint nor SIGTERM during a transfer hangs it.

Each test lists what must survive before and after, against the GCS server on loopback
(devkit/gcs_emulator.py, which keeps names such as `a/../b` verbatim, as GCS does) or real folders.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import storage
from devkit import gcs_emulator
from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED
from tests.conftest import CHECKPOINT_FOLDER_BEFORE, ROOT, job_environment, run_in_process
from tests.test_storage import object_contents, tree_contents, upload_tree


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR job: " in line]


def assert_one_line_exit(result, code: int, *words: str) -> None:
    errors = error_lines(result.stderr)
    assert result.returncode == code, result.stderr[-3000:]
    assert len(errors) == 1 and all(word in errors[0] for word in words), errors
    assert "Traceback" not in result.stderr


@pytest.fixture
def completed_runs(gcs_client, gcs_bucket):
    """A bucket holding two completed runs under runs/; returns (bucket name, their objects)."""
    bucket = gcs_client.bucket(gcs_bucket)
    for run in ("nightly-1", "nightly-2"):
        for name in ("MANIFEST.json", "metrics.json", "saved_model/saved_model.pb"):
            bucket.blob(f"runs/{run}/{name}").upload_from_string(f"{run} {name}".encode())
    return gcs_bucket, object_contents(gcs_client, gcs_bucket)


# --- 1-3: the job deletes only what it can prove it wrote ---

def test_checkpoint_uri_equal_to_output_uri_is_refused_and_the_bucket_kept(
        completed_runs, gcs_client, gcs_endpoint, tmp_path, main_in_process):
    bucket, before = completed_runs
    result = main_in_process("job", {"DATA_URI": str(tmp_path), "OUTPUT_URI": f"gs://{bucket}/runs",
                                     "CHECKPOINT_URI": f"gs://{bucket}/runs", "RUN_ID": "nightly-3",
                                     "STORAGE_EMULATOR_HOST": gcs_endpoint})
    assert_one_line_exit(result, EXIT_BAD_INPUT, "OUTPUT_URI/RUN_ID", "CHECKPOINT_URI/RUN_ID",
                         "overlap")
    assert object_contents(gcs_client, bucket) == before


def test_checkpoint_prefix_holding_files_the_job_did_not_write_is_refused_at_start(
        completed_runs, gcs_client, gcs_endpoint, tmp_path):
    bucket, before = completed_runs
    result = run_in_process("job", {
        "DATA_URI": str(tmp_path), "OUTPUT_URI": f"gs://{bucket}/new-runs",
        "CHECKPOINT_URI": f"gs://{bucket}/runs", "RUN_ID": "nightly-1",
        "STORAGE_EMULATOR_HOST": gcs_endpoint, "WEIGHTS": "none"})
    assert_one_line_exit(result, EXIT_BAD_INPUT, "CHECKPOINT_URI", "did not write")
    assert object_contents(gcs_client, bucket) == before


def test_a_completed_run_leaves_an_existing_local_checkpoint_folder_as_it_was(tiny_run):
    result, shared = tiny_run["result"], tiny_run["checkpoints"]  # the shared tiny run's
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints" in result.stderr and (tiny_run["run_dir"] / "MANIFEST.json").exists()
    assert tree_contents(shared) == CHECKPOINT_FOLDER_BEFORE and not (shared / "tiny").exists()


@pytest.mark.parametrize("variable", ["CHECKPOINT_URI", "DATA_URI", "OUTPUT_URI"])
def test_dot_dot_in_a_gs_uri_is_refused_and_nothing_outside_the_cache_is_touched(variable, tmp_path,
                                                                                  main_in_process):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    uri = "gs://b/x/" + "../" * 8 + str(victim).lstrip("/")
    settings = {"DATA_URI": "gs://b/data", "CACHE_DIR": str(tmp_path / "cache"), variable: uri}
    result = main_in_process("job", settings)
    assert_one_line_exit(result, EXIT_BAD_INPUT, f"{variable}=", "'..' component")
    assert tree_contents(victim) == {"precious.txt": b"keep me"}


@pytest.mark.parametrize("settings", [
    {"DATA_URI": "/srv/images", "OUTPUT_URI": "/srv/images"},
    {"DATA_URI": "/srv/images", "CACHE_DIR": "/srv"},
])
def test_local_places_that_overlap_are_refused_with_exit_2(settings, main_in_process):
    result = main_in_process("job", settings)
    assert_one_line_exit(result, EXIT_BAD_INPUT, "overlap", "DATA_URI")


def test_a_cache_dir_holding_other_files_is_refused_untouched(tmp_path):
    (tmp_path / "home" / "photos").mkdir(parents=True)
    (tmp_path / "home" / "photos" / "cat.jpg").write_bytes(b"jpeg")
    result = run_in_process("job", {"DATA_URI": str(tmp_path / "absent"),
                                    "CACHE_DIR": str(tmp_path / "home")})
    assert_one_line_exit(result, EXIT_BAD_INPUT, "CACHE_DIR", "did not write")
    assert tree_contents(tmp_path / "home") == {"photos/cat.jpg": b"jpeg"}


# --- 7: object names that cannot be local files are skipped with their reason ---

UNSTORABLE = {  # object name under the data prefix -> a word of the reason it is skipped
    "NORMAL/../../../../victim/x.jpeg": "'..' component",
    "NORMAL/./y.jpeg": "'.' or '..' component",
    "NORMAL//a.jpeg": "empty component",
    "/NORMAL/b.jpeg": "empty component",
    "NORMAL/" + "n" * 300 + ".jpeg": "longer than 255 bytes",
    "NORMAL/c.jpeg.partial": "unfinished downloads",
    "NORMAL/a.jpeg/inside.jpeg": "as a folder, but it is an object",
}


def test_object_names_that_cannot_be_local_files_are_skipped_with_their_reasons(
        gcs_client, gcs_bucket, file_tree, tmp_path):
    upload_tree(gcs_client, gcs_bucket, "data", file_tree)
    for name in UNSTORABLE:
        gcs_client.bucket(gcs_bucket).blob(f"data/{name}").upload_from_string(b"odd")
    victim = tmp_path / "victim"
    stats = storage.pull_tree(f"gs://{gcs_bucket}/data", tmp_path / "cache" / "a" / "b" / "c" / "d")
    assert {name: reason for name, reason in stats.skipped.items()}.keys() == UNSTORABLE.keys()
    assert all(word in stats.skipped[name] for name, word in UNSTORABLE.items())
    assert tree_contents(tmp_path / "cache" / "a" / "b" / "c" / "d") == tree_contents(file_tree)
    assert not victim.exists()


def test_a_prefix_with_only_unstorable_names_is_a_one_line_error_naming_one(gcs_client, gcs_bucket,
                                                                            tmp_path):
    gcs_client.bucket(gcs_bucket).blob("data/a/../b.jpeg").upload_from_string(b"odd")
    with pytest.raises(storage.Unusable) as error:  # exit 2: retrying cannot help
        storage.pull_tree(f"gs://{gcs_bucket}/data", tmp_path / "local")
    assert "no usable objects" in str(error.value) and "'a/../b.jpeg'" in str(error.value)


# --- 4: a dead endpoint and SIGTERM during a transfer ---

@pytest.fixture
def slow_server(tmp_path, monkeypatch):
    """A GCS server of the test's own (it is killed) answering each request after 50 ms; yields
    (process, url), with the client pointed at it."""
    port = gcs_emulator.free_port()
    process = subprocess.Popen([sys.executable, gcs_emulator.__file__, str(port), "50"])
    url = f"http://127.0.0.1:{port}"
    gcs_emulator.wait_until_up(url, process)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    yield process, url
    process.kill()
    process.wait()


def upload_many_small(bucket_name: str, prefix: str, count: int) -> dict[str, bytes]:
    """count distinct small objects under prefix/<class>/; returns {relative name: content}."""
    from google.cloud import storage as gcs

    client = gcs.Client(project="test")
    contents = {f"{'ab'[n % 2]}/{n:04d}.bin": os.urandom(200) for n in range(count)}
    client.create_bucket(bucket_name)
    bucket = client.bucket(bucket_name)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda item: bucket.blob(f"{prefix}/{item[0]}").upload_from_string(item[1]),
                      contents.items()))
    return contents


def test_a_dead_endpoint_fails_the_pull_within_its_deadline_keeping_finished_files(
        slow_server, tmp_path):
    process, _ = slow_server
    contents = upload_many_small("dead", "data", 400)  # 400 x 50 ms / 8 threads: 2.5 s to pull
    local = tmp_path / "local"
    outcome = {}

    def pull():
        try:
            storage.pull_tree("gs://dead/data", local, retry_deadline=3.0)
        except storage.StorageError as error:
            outcome["error"], outcome["at"] = error, time.monotonic()

    puller = threading.Thread(target=pull)
    puller.start()
    while len(list(local.rglob("*.bin"))) < 40:
        time.sleep(0.05)
    process.kill()
    killed = time.monotonic()
    puller.join(timeout=60)
    assert "error" in outcome, "the pull did not fail after its endpoint died"
    assert outcome["at"] - killed < 3.0 + 4.0  # the deadline, and the last backoff step
    assert "still failing after retrying for 3 s" in str(outcome["error"])
    kept = {path.relative_to(local).as_posix(): path.read_bytes() for path in local.rglob("*.bin")}
    assert len(kept) >= 40 and all(contents[name] == data for name, data in kept.items())


def test_a_job_whose_endpoint_is_dead_exits_1_within_storage_deadline(tmp_path):
    started = time.monotonic()
    result = run_in_process("job", {
        "DATA_URI": "gs://bucket/data", "CACHE_DIR": str(tmp_path / "cache"),
        "OUTPUT_URI": str(tmp_path / "out"), "WEIGHTS": "none", "STORAGE_DEADLINE": "3",
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_emulator.free_port()}"})
    assert_one_line_exit(result, EXIT_FAILED, "gs://bucket", "still failing after retrying for 3 s")
    assert time.monotonic() - started < 60  # the 3 s, and the retries' last backoff


def test_sigterm_during_the_pull_exits_75_within_10_s_keeping_finished_downloads(
        slow_server, tmp_path):
    _, url = slow_server
    contents = upload_many_small("term", "data", 1200)  # about 8 s to pull
    cache = tmp_path / "cache"
    log_path = tmp_path / "job.log"
    env = job_environment({"DATA_URI": "gs://term/data", "CACHE_DIR": str(cache),
                           "OUTPUT_URI": str(tmp_path / "out"), "RUN_ID": "r1",
                           "WEIGHTS": "none", "STORAGE_EMULATOR_HOST": url})
    with open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, "-m", "job"], cwd=ROOT, env=env, stderr=log)
    mirror = cache / "data" / "term" / "data"
    deadline = time.monotonic() + 120
    while len(list(mirror.rglob("*.bin"))) < 100:
        assert job.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the pull did not start"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert job.wait(timeout=30) == EXIT_PREEMPTED, log_path.read_text()[-3000:]
    assert time.monotonic() - sent < 10
    assert "preempted" in log_path.read_text()
    kept = {path.relative_to(mirror).as_posix(): path.read_bytes() for path in mirror.rglob("*.bin")}
    assert 100 <= len(kept) < len(contents)
    assert all(contents[name] == data for name, data in kept.items())
    again = storage.pull_tree("gs://term/data", mirror)  # a restart pulls only what is missing
    assert again.cached >= len(kept) and tree_contents(mirror) == contents


# --- 8, 9: settings that cannot work fail at once, in one line, with exit 2 ---

@pytest.mark.parametrize("settings, words", [
    ({"WEIGHTS": "/nonexistent.h5"}, ("WEIGHTS", "/nonexistent.h5", "no such file")),
    ({"OUTPUT_URI": "/etc/hostname"}, ("OUTPUT_URI", "is a file")),
    ({"CACHE_DIR": "/proc/nope"}, ("CACHE_DIR", "cannot be written")),
])
def test_a_setting_that_cannot_work_exits_2_before_the_data_is_read(settings, words, tmp_path):
    settings = {"DATA_URI": str(tmp_path / "never-read"), "CACHE_DIR": str(tmp_path / "cache"),
                "OUTPUT_URI": str(tmp_path / "out"), **settings}
    result = run_in_process("job", settings)
    assert_one_line_exit(result, EXIT_BAD_INPUT, *words)
    assert "never-read" not in result.stderr  # it failed before looking at the data


def test_weights_missing_from_the_bucket_exit_2(gcs_bucket, gcs_endpoint, tmp_path):
    result = run_in_process("job", {
        "DATA_URI": str(tmp_path / "never-read"), "CACHE_DIR": str(tmp_path / "c"),
        "OUTPUT_URI": str(tmp_path / "out"), "STORAGE_EMULATOR_HOST": gcs_endpoint,
        "WEIGHTS": f"gs://{gcs_bucket}/vgg16.h5"})
    assert_one_line_exit(result, EXIT_BAD_INPUT, "WEIGHTS", "no such object")
