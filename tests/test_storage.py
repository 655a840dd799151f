"""storage/: pulls, publishes and owned prefixes against a real GCS-compatible server on loopback
(see devkit/gcs_emulator.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import storage
from devkit import gcs_emulator
from job.inputs.shard import Shard
from storage import StorageError
from tests.conftest import random_vgg16_weights, run_in_process

QUICK = {"retry_deadline": 5.0}
REPO = Path(__file__).resolve().parents[1]


def tree_contents(root: Path) -> dict[str, bytes]:
    """Every file under root as {relative posix path: bytes}."""
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(Path(root).rglob("*")) if path.is_file()}


def upload_tree(client, bucket_name: str, prefix: str, root: Path) -> None:
    for relative, content in tree_contents(root).items():
        client.bucket(bucket_name).blob(f"{prefix}/{relative}").upload_from_string(content)


def object_contents(client, bucket_name: str, prefix: str = "") -> dict[str, bytes]:
    return {blob.name: blob.download_as_bytes()
            for blob in client.list_blobs(bucket_name, prefix=prefix)}


@pytest.fixture
def remote_tree(gcs_client, gcs_bucket, file_tree):
    """file_tree uploaded to gs://<bucket>/data; returns that URI."""
    upload_tree(gcs_client, gcs_bucket, "data", file_tree)
    return f"gs://{gcs_bucket}/data"


@pytest.fixture
def run_dir(tmp_path):
    """A finished run directory: outputs plus the MANIFEST.json completion marker."""
    root = tmp_path / "run"
    (root / "saved_model" / "variables").mkdir(parents=True)
    (root / "saved_model" / "variables" / "variables.data").write_bytes(b"w" * 5000)
    (root / "saved_model" / "saved_model.pb").write_bytes(b"graph")
    (root / "metrics.json").write_text('{"accuracy": 0.9}')
    (root / "MANIFEST.json").write_text('{"files": 3}')
    return root


# --- URIs ---

def test_join_builds_object_names_without_doubled_slashes():
    assert storage.join("gs://bucket/runs/", "r1", "/MANIFEST.json") == "gs://bucket/runs/r1/MANIFEST.json"


def test_local_dir_for_a_remote_uri_is_bucket_and_key_under_the_cache(tmp_path):
    assert storage.local_dir_for("gs://bucket/a/b", tmp_path) == tmp_path / "bucket" / "a" / "b"


def test_local_dir_for_a_local_path_is_the_path_itself(tmp_path):
    assert storage.local_dir_for(str(tmp_path / "x"), tmp_path / "cache") == tmp_path / "x"


# --- Pull ---

def test_pulled_tree_equals_the_source(remote_tree, file_tree, tmp_path):
    local = storage.fetch_tree(remote_tree, tmp_path / "cache")
    assert local == tmp_path / "cache" / remote_tree[len("gs://"):]
    assert tree_contents(local) == tree_contents(file_tree)


def test_pull_reports_objects_and_bytes_and_logs_them(remote_tree, file_tree, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="storage"):
        stats = storage.pull_tree(remote_tree, tmp_path / "local")
    assert (stats.objects, stats.bytes, stats.cached) == (
        5, sum(map(len, tree_contents(file_tree).values())), 0)
    assert stats.seconds > 0 and stats.mb_per_s > 0
    assert f"pulled {remote_tree}" in caplog.text and "5 objects" in caplog.text


def test_second_pull_of_the_same_prefix_downloads_nothing(remote_tree, tmp_path):
    storage.pull_tree(remote_tree, tmp_path / "local")
    stats = storage.pull_tree(remote_tree, tmp_path / "local")
    assert (stats.objects, stats.bytes, stats.cached) == (0, 0, 5)


def test_pull_downloads_again_a_cached_file_with_the_same_size_but_other_bytes(
        remote_tree, file_tree, tmp_path):
    local = tmp_path / "local"
    storage.pull_tree(remote_tree, local)
    corrupted = local / "NORMAL" / "a.jpeg"
    corrupted.write_bytes(bytes(len(corrupted.read_bytes())))
    stats = storage.pull_tree(remote_tree, local)
    assert (stats.objects, stats.cached) == (1, 4)
    assert corrupted.read_bytes() == (file_tree / "NORMAL" / "a.jpeg").read_bytes()


def test_pull_deletes_local_files_that_are_not_under_the_prefix(remote_tree, tmp_path):
    local = tmp_path / "local"
    storage.pull_tree(remote_tree, local)
    (local / "NORMAL" / "removed-from-the-bucket.jpeg").write_bytes(b"stale")
    stats = storage.pull_tree(remote_tree, local)
    assert stats.removed == 1
    assert not (local / "NORMAL" / "removed-from-the-bucket.jpeg").exists()


def test_a_sharded_pull_mirrors_only_the_shard_and_makes_every_folder(remote_tree, file_tree,
                                                                    tmp_path):
    names = set(tree_contents(file_tree))
    pulled = {}
    for index in range(2):
        shard = Shard(index, 2)
        local = tmp_path / f"worker{index}"
        stats = storage.pull_tree(remote_tree, local,
                                  select=lambda listed: shard.select(listed, seed=42))
        pulled[index] = set(tree_contents(local))
        assert pulled[index] == shard.select(names, seed=42)
        assert stats.objects == len(pulled[index])
        assert {"NORMAL", "PNEUMONIA", "PNEUMONIA/sub"} <= {
            path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_dir()}
        again = storage.pull_tree(remote_tree, local,  # a restarted worker: its cache holds it
                                  select=lambda listed: shard.select(listed, seed=42))
        assert (again.objects, again.cached, again.removed) == (0, len(pulled[index]), 0)
    assert pulled[0] | pulled[1] == names and not pulled[0] & pulled[1]


def test_pull_of_a_prefix_larger_than_one_batch_gets_every_object(remote_tree, file_tree, tmp_path):
    stats = storage.pull_tree(remote_tree, tmp_path / "local", batch_size=2, max_workers=2)
    assert stats.objects == 5
    assert tree_contents(tmp_path / "local") == tree_contents(file_tree)


def test_pull_does_not_match_a_sibling_prefix_that_starts_the_same(
        gcs_client, gcs_bucket, remote_tree, tmp_path):
    gcs_client.bucket(gcs_bucket).blob("data2/other.jpeg").upload_from_string(b"other")
    local = storage.fetch_tree(remote_tree, tmp_path / "cache")
    assert not any("other" in name for name in tree_contents(local))


def test_interrupted_download_leaves_no_file_and_keeps_the_finished_ones(
        faulty_gcs, remote_tree, tmp_path):
    faulty_gcs.fail(times=100, status=403, matching=b"c.jpeg?")
    with pytest.raises(StorageError):
        storage.pull_tree(remote_tree, tmp_path / "local", **QUICK)
    left = sorted(tree_contents(tmp_path / "local"))
    assert left == ["NORMAL/a.jpeg", "NORMAL/b.jpeg", "PNEUMONIA/sub/d.jpeg", "labels.txt"]


def test_transient_errors_are_retried_and_the_pull_succeeds(faulty_gcs, remote_tree, file_tree, tmp_path):
    faulty_gcs.fail(times=1, status=503, matching=b"/o?")  # the listing
    faulty_gcs.fail(times=3, status=503, matching=b"alt=media")  # three downloads
    storage.pull_tree(remote_tree, tmp_path / "local", **QUICK)
    assert tree_contents(tmp_path / "local") == tree_contents(file_tree)
    assert faulty_gcs.injected == 4


# --- Errors: one line naming the URI and the cause ---

def assert_one_line_error(error: pytest.ExceptionInfo, uri: str, cause: str) -> None:
    message = str(error.value)
    assert message.startswith(uri) and cause in message and "\n" not in message, message


def test_missing_bucket_is_a_one_line_error(gcs_endpoint, tmp_path):
    with pytest.raises(StorageError) as error:
        storage.fetch_tree("gs://no-such-bucket/data", tmp_path, **QUICK)
    assert_one_line_error(error, "gs://no-such-bucket/data", "bucket 'no-such-bucket' does not exist")


def test_missing_prefix_is_a_one_line_error(gcs_bucket, tmp_path):
    with pytest.raises(StorageError) as error:
        storage.fetch_tree(f"gs://{gcs_bucket}/nothing-here", tmp_path, **QUICK)
    assert_one_line_error(error, f"gs://{gcs_bucket}/nothing-here", "no usable objects under this prefix")


def test_missing_object_is_a_one_line_error(gcs_bucket, tmp_path):
    with pytest.raises(StorageError) as error:
        storage.fetch_file(f"gs://{gcs_bucket}/weights.h5", tmp_path, **QUICK)
    assert_one_line_error(error, f"gs://{gcs_bucket}/weights.h5", "no such object")


def test_denied_access_is_a_one_line_error(faulty_gcs, remote_tree, tmp_path):
    faulty_gcs.fail(times=100, status=403)
    with pytest.raises(StorageError) as error:
        storage.fetch_tree(remote_tree, tmp_path, **QUICK)
    assert_one_line_error(error, remote_tree, "access denied")


def test_server_that_is_down_is_a_one_line_error_after_retrying(monkeypatch, tmp_path):
    down = f"http://127.0.0.1:{gcs_emulator.free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", down)
    with pytest.raises(StorageError) as error:
        storage.fetch_tree("gs://bucket/data", tmp_path, retry_deadline=1.0)
    assert_one_line_error(error, "gs://bucket/data", f"{down} still failing after retrying for 1 s")


def test_missing_credentials_are_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(StorageError) as error:
        storage.fetch_tree("gs://bucket/data", tmp_path, **QUICK)
    assert_one_line_error(error, "gs://bucket/data", "no Application Default Credentials")


def test_with_an_emulator_host_no_credentials_are_looked_up(remote_tree, monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    assert storage.pull_tree(remote_tree, tmp_path / "local").objects == 5


# --- Local paths ---

def test_fetch_tree_of_a_local_directory_is_that_directory(file_tree, tmp_path):
    assert storage.fetch_tree(str(file_tree), tmp_path / "cache") == file_tree


def test_fetch_tree_of_a_missing_local_directory_is_an_error(tmp_path):
    with pytest.raises(StorageError, match="no such directory"):
        storage.fetch_tree(str(tmp_path / "missing"), tmp_path / "cache")


# --- Files ---

def test_fetch_file_downloads_a_remote_weights_file_into_the_cache(gcs_client, gcs_bucket, tmp_path):
    gcs_client.bucket(gcs_bucket).blob("weights/vgg16.h5").upload_from_string(b"h5" * 1000)
    path = storage.fetch_file(f"gs://{gcs_bucket}/weights/vgg16.h5", tmp_path / "cache")
    assert path == tmp_path / "cache" / gcs_bucket / "weights" / "vgg16.h5"
    assert path.read_bytes() == b"h5" * 1000


def test_exists_sees_objects_and_prefixes(gcs_client, gcs_bucket):
    gcs_client.bucket(gcs_bucket).blob("runs/r1/MANIFEST.json").upload_from_string(b"{}")
    assert storage.exists(f"gs://{gcs_bucket}/runs/r1/MANIFEST.json")
    assert storage.exists(f"gs://{gcs_bucket}/runs/r1")
    assert not storage.exists(f"gs://{gcs_bucket}/runs/r2/MANIFEST.json")


def test_exists_in_a_missing_bucket_is_an_error_not_false(gcs_endpoint):
    with pytest.raises(StorageError, match="does not exist"):
        storage.exists("gs://no-such-bucket/runs/r1/MANIFEST.json", **QUICK)


# --- Push ---

def test_publish_uploads_every_file(gcs_client, gcs_bucket, run_dir):
    stats = storage.publish_tree(run_dir, f"gs://{gcs_bucket}/runs/r1", last="MANIFEST.json")
    assert stats.objects == 4
    assert object_contents(gcs_client, gcs_bucket) == {
        f"runs/r1/{name}": content for name, content in tree_contents(run_dir).items()}


def test_publish_writes_the_marker_after_every_other_file(gcs_client, gcs_bucket, run_dir):
    storage.publish_tree(run_dir, f"gs://{gcs_bucket}/runs/r1", last="MANIFEST.json")
    generations = {blob.name: blob.generation for blob in gcs_client.list_blobs(gcs_bucket)}
    marker = generations.pop("runs/r1/MANIFEST.json")
    assert all(generation < marker for generation in generations.values())


def test_publish_writes_no_marker_when_another_file_fails(faulty_gcs, gcs_client, gcs_bucket, run_dir):
    faulty_gcs.fail(times=100, status=403, matching=b"metrics.json")
    with pytest.raises(StorageError, match="access denied"):
        storage.publish_tree(run_dir, f"gs://{gcs_bucket}/runs/r1", last="MANIFEST.json", **QUICK)
    assert not storage.exists(f"gs://{gcs_bucket}/runs/r1/MANIFEST.json")


def test_publish_refuses_to_overwrite_a_completed_run(gcs_bucket, run_dir):
    uri = f"gs://{gcs_bucket}/runs/r1"
    storage.publish_tree(run_dir, uri, last="MANIFEST.json")
    with pytest.raises(StorageError, match="already holds a completed run"):
        storage.publish_tree(run_dir, uri, last="MANIFEST.json")


def test_local_publish_refuses_to_overwrite_a_completed_run(run_dir, tmp_path):
    storage.publish_tree(run_dir, str(tmp_path / "published"), last="MANIFEST.json")
    with pytest.raises(StorageError, match="already holds a completed run"):
        storage.publish_tree(run_dir, str(tmp_path / "published"), last="MANIFEST.json")


# --- Owned prefixes (checkpoints): the job deletes only what it recorded writing ---

def test_sync_owned_then_pull_owned_round_trips_a_directory(gcs_bucket, file_tree, tmp_path):
    uri = f"gs://{gcs_bucket}/ckpt/r1"
    storage.sync_owned(file_tree, uri, "r1")
    storage.pull_owned(uri, tmp_path / "restored", "r1")
    assert tree_contents(tmp_path / "restored") == tree_contents(file_tree)


def test_sync_owned_uploads_only_changes_and_deletes_only_what_it_recorded(
        gcs_client, gcs_bucket, file_tree):
    uri = f"gs://{gcs_bucket}/ckpt/r1"
    storage.sync_owned(file_tree, uri, "r1")
    gcs_client.bucket(gcs_bucket).blob("ckpt/r1/someone-elses.txt").upload_from_string(b"keep")
    (file_tree / "labels.txt").unlink()
    (file_tree / "NORMAL" / "a.jpeg").write_bytes(b"epoch 2")
    stats = storage.sync_owned(file_tree, uri, "r1")
    assert (stats.objects, stats.cached, stats.removed) == (1, 3, 1)
    objects = object_contents(gcs_client, gcs_bucket)
    assert objects.pop("ckpt/r1/someone-elses.txt") == b"keep"
    assert json.loads(objects.pop("ckpt/r1/WRITTEN.json"))["names"] == sorted(tree_contents(file_tree))
    assert objects == {f"ckpt/r1/{name}": content for name, content in tree_contents(file_tree).items()}


def test_clear_owned_deletes_what_the_run_wrote_and_nothing_else(gcs_client, gcs_bucket, file_tree):
    bucket = gcs_client.bucket(gcs_bucket)
    bucket.blob("ckpt/other-run/state.json").upload_from_string(b"other run")
    storage.sync_owned(file_tree, f"gs://{gcs_bucket}/ckpt/r1", "r1")
    bucket.blob("ckpt/r1/added-later.txt").upload_from_string(b"not the job's")
    assert storage.clear_owned(f"gs://{gcs_bucket}/ckpt/r1", "r1") == len(tree_contents(file_tree))
    assert object_contents(gcs_client, gcs_bucket) == {"ckpt/other-run/state.json": b"other run",
                                                       "ckpt/r1/added-later.txt": b"not the job's"}


def test_a_prefix_holding_files_the_job_did_not_write_is_refused_untouched(
        gcs_client, gcs_bucket, file_tree):
    gcs_client.bucket(gcs_bucket).blob("runs/r0/MANIFEST.json").upload_from_string(b"{}")
    before = object_contents(gcs_client, gcs_bucket)
    for call in (lambda: storage.claim_owned(f"gs://{gcs_bucket}/runs", "r1"),
                 lambda: storage.sync_owned(file_tree, f"gs://{gcs_bucket}/runs", "r1"),
                 lambda: storage.clear_owned(f"gs://{gcs_bucket}/runs", "r1")):
        with pytest.raises(storage.Unusable, match="holds 1 files this job did not write"):
            call()
    assert object_contents(gcs_client, gcs_bucket) == before


def test_a_prefix_recorded_by_another_run_is_refused(gcs_bucket, file_tree, tmp_path):
    storage.sync_owned(file_tree, f"gs://{gcs_bucket}/ckpt", "r1")
    with pytest.raises(storage.Unusable, match="belongs to run 'r1', not 'r2'"):
        storage.pull_owned(f"gs://{gcs_bucket}/ckpt", tmp_path / "restored", "r2")


def test_a_record_naming_files_outside_its_prefix_is_refused(gcs_client, gcs_bucket, tmp_path):
    record = {"owner": "r1", "names": ["../../../../escaped.txt"]}
    gcs_client.bucket(gcs_bucket).blob("ckpt/r1/WRITTEN.json").upload_from_string(json.dumps(record))
    gcs_client.bucket(gcs_bucket).blob("ckpt/r1/../../../../escaped.txt").upload_from_string(b"x")
    with pytest.raises(storage.Unusable, match="not a record this job wrote"):
        storage.pull_owned(f"gs://{gcs_bucket}/ckpt/r1", tmp_path / "a" / "b" / "c" / "d", "r1")
    assert list(tmp_path.rglob("escaped.txt")) == []


def test_pull_owned_of_a_prefix_with_nothing_yet_gives_an_empty_directory(gcs_bucket, tmp_path):
    stats = storage.pull_owned(f"gs://{gcs_bucket}/ckpt/r1", tmp_path / "restored", "r1")
    assert stats.objects == 0 and tree_contents(tmp_path / "restored") == {}


def test_local_owned_folder_keeps_what_was_there_and_loses_only_what_it_wrote(file_tree, tmp_path):
    target = tmp_path / "existing" / "r1"
    (tmp_path / "existing" / "keep.txt").parent.mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("the user's")
    storage.sync_owned(file_tree, str(target), "r1")
    assert {k: v for k, v in tree_contents(target).items() if k != "WRITTEN.json"} == \
        tree_contents(file_tree)
    storage.clear_owned(str(target), "r1")
    assert tree_contents(tmp_path / "existing") == {"keep.txt": b"the user's"}
    assert not target.exists()  # the folders it made, now empty, are gone too


def test_two_clears_of_one_folder_at_once_never_find_files_without_their_record(tmp_path,
                                                                                monkeypatch):
    """A run's writer clearing its checkpoints as it ends, and a rerun that found the run complete
    clearing them too: the record is deleted last, so neither finds files it cannot prove its
    own (the rerun exited 2, "holds 1 files this job did not write (e.g. 'state.json')", when
    WRITTEN.json, first in name order, went first)."""
    checkpoints, target = tmp_path / "local", tmp_path / "ckpt"
    for name in ("state.json", "phase1/weights.h5"):
        (checkpoints / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoints / name).write_bytes(name.encode())
    storage.sync_owned(checkpoints, str(target), "r1")
    unlink, raced = Path.unlink, []

    def unlink_then_race(path, missing_ok=False):
        unlink(path, missing_ok=missing_ok)
        if not raced:  # the other process clears between this one's first and second deletion
            raced.append(path.name)
            storage.clear_owned(str(target), "r1")

    monkeypatch.setattr(Path, "unlink", unlink_then_race)
    storage.clear_owned(str(target), "r1")
    assert raced and not target.exists()

# --- The cache folder ---

def test_cache_dir_is_created_with_the_jobs_marker(tmp_path):
    storage.claim_cache(tmp_path / "cache")
    assert (tmp_path / "cache" / storage.CACHE_MARKER).is_file()
    storage.claim_cache(tmp_path / "cache")  # and is the job's from then on


def test_cache_dir_holding_other_files_is_refused_untouched(file_tree):
    before = tree_contents(file_tree)
    with pytest.raises(storage.Unusable, match="holds files this job did not write"):
        storage.claim_cache(file_tree)
    assert tree_contents(file_tree) == before


@pytest.mark.parametrize("path, problem", [("/etc/hostname", "is a file"),
                                           ("/proc/nope", "cannot be written")])
def test_cache_dir_that_cannot_be_a_folder_is_a_one_line_error(path, problem):
    with pytest.raises(storage.Unusable, match=problem):
        storage.claim_cache(Path(path))


# --- The whole job on gs:// ---

REAL_DATA = REPO.parent / "shared" / "data" / "chest_xray_pneumonia_224"


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real images not found at {REAL_DATA}")
def test_job_reads_and_writes_gs_uris_publishes_the_marker_last_and_deletes_only_its_own(
        gcs_client, gcs_bucket, gcs_endpoint, tmp_path):
    bucket = gcs_client.bucket(gcs_bucket)
    for class_name in ("NORMAL", "PNEUMONIA"):
        for image in sorted((REAL_DATA / "train" / class_name).glob("*.jpeg"))[:20]:
            bucket.blob(f"data/{class_name}/{image.name}").upload_from_filename(image)
    bucket.blob("data/NORMAL/../../escape.jpeg").upload_from_string(b"odd")
    for name in ("runs/older/MANIFEST.json", "ckpt/older/state.json", "ckpt/notes.txt"):
        bucket.blob(name).upload_from_string(name.encode())
    others = object_contents(gcs_client, gcs_bucket, "runs/") | object_contents(
        gcs_client, gcs_bucket, "ckpt/")
    env = {"STORAGE_EMULATOR_HOST": gcs_endpoint,
           "DATA_URI": f"gs://{gcs_bucket}/data", "OUTPUT_URI": f"gs://{gcs_bucket}/runs",
           "CHECKPOINT_URI": f"gs://{gcs_bucket}/ckpt",
           "RUN_ID": "e2e", "CACHE_DIR": str(tmp_path / "cache"), "BACKBONE": "vgg16",
           "WEIGHTS": random_vgg16_weights(), "IMAGE_SIZE": "32", "BATCH_SIZE": "8", "HEAD_EPOCHS": "1",
           "FINE_TUNE_EPOCHS": "1"}
    job = run_in_process("job", env)
    assert job.returncode == 0, job.stderr[-3000:]
    generations = {blob.name: blob.generation
                   for blob in gcs_client.list_blobs(gcs_bucket, prefix="runs/e2e/")}
    marker = generations.pop("runs/e2e/MANIFEST.json")
    assert {"runs/e2e/metrics.json", "runs/e2e/saved_model/saved_model.pb"} <= set(generations)
    assert all(generation < marker for generation in generations.values())
    after = object_contents(gcs_client, gcs_bucket, "ckpt/")
    assert "synced" in job.stderr and "cleared gs://" in job.stderr  # it did checkpoint there
    assert after == {name: others[name] for name in others if name.startswith("ckpt/")}
    assert {name: content for name, content in object_contents(gcs_client, gcs_bucket, "runs/")
            .items() if not name.startswith("runs/e2e/")} == \
        {name: others[name] for name in others if name.startswith("runs/")}
    metrics = json.loads(bucket.blob("runs/e2e/metrics.json").download_as_bytes())
    assert "'..' component" in metrics["skipped_files"]["NORMAL/../../escape.jpeg"]
