"""One writer per run: a run is published by one writer, and a complete run is never modified.

Two processes of one RUN_ID (a duplicate Job, or the replacement pod Kubernetes starts while the
old one terminates), on gs:// and on local folders, in either order and with either one slowed:
the run is published once, matches its MANIFEST.json, and the other process exits with a code
that does not invite a retry. Claims (job/results/writer.py) are tested in-process and with the writer
processes of tests/writer_process.py; the conditional uploads (storage/__init__.py) against the GCS
emulator, which holds generations and preconditions as GCS does.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import storage
from common import run_files
from devkit import gcs_emulator
from job.results import writer
from tests.conftest import (ROOT, job_environment, run_in_process, start_job, tiny_vgg16_settings,
                            write_class_images)
from tests.test_storage import tree_contents
from tests.writer_process import write_run

QUICK = {"poll_s": 0.05, "retry_deadline": 10}
WRITER = "tests.writer_process"  # run with `python -m` from the repository root


def run_uri_for(where: str, gcs_bucket: str | None, tmp_path: Path) -> str:
    return f"gs://{gcs_bucket}/runs/r1" if where == "gs" else str(tmp_path / "out" / "r1")


def published(run_uri: str, gcs_client=None) -> dict[str, bytes]:
    """The run's files as {name relative to the run: bytes}, but the claim."""
    if storage.is_remote(run_uri):
        bucket_name, prefix = run_uri[len("gs://"):].split("/", 1)
        # Read by name: a listed object's mediaLink names the host it was uploaded through.
        bucket = gcs_client.bucket(bucket_name)
        files = {blob.name[len(prefix) + 1:]: bucket.blob(blob.name).download_as_bytes()
                 for blob in gcs_client.list_blobs(bucket_name, prefix=prefix + "/")}
    else:
        files = tree_contents(Path(run_uri))
    files.pop(writer.CLAIM, None)
    return files


def assert_matches_its_manifest(files: dict[str, bytes]) -> dict:
    """Every file the MANIFEST.json lists is there with its checksum, and nothing else is."""
    import hashlib

    manifest = json.loads(files.pop(run_files.MANIFEST))["files"]
    assert set(files) == set(manifest)
    for name, entry in manifest.items():
        assert hashlib.sha256(files[name]).hexdigest() == entry["sha256"], name
    return manifest


def staged_run(tmp_path: Path, name: str) -> Path:
    folder = writer.fresh_staging(tmp_path / f"staging-{name}")
    write_run(folder, name)
    return folder


def claim_in_thread(run_uri: str, **options) -> tuple[threading.Thread, dict]:
    """Takes the claim on another thread; its outcome ("claim" or "error", and "at") lands in
    the dict returned."""
    outcome: dict = {}

    def take():
        try:
            with writer.claimed(run_uri, **{**QUICK, **options}) as claim:
                outcome["claim"], outcome["at"] = claim, time.monotonic()
        except storage.StorageError as error:
            outcome["error"], outcome["at"] = error, time.monotonic()

    thread = threading.Thread(target=take)
    thread.start()
    return thread, outcome


# --- claims ---

@pytest.mark.parametrize("where", ["gs", "local"])
def test_a_second_writer_waits_for_the_claim_then_gives_up_naming_the_holder(
        where, gcs_bucket, tmp_path):
    run_uri = run_uri_for(where, gcs_bucket, tmp_path)
    with writer.claimed(run_uri, heartbeat_s=0.2, **QUICK):
        started = time.monotonic()
        with pytest.raises(writer.WrittenElsewhere) as refused:
            with writer.claimed(run_uri, wait_s=1.0, stale_after_s=10, **QUICK):
                pass
    assert 1.0 <= time.monotonic() - started < 5
    message = str(refused.value)
    assert run_uri in message and "being written by pid" in message and "\n" not in message
    assert isinstance(refused.value, storage.Unusable)  # exit 2: a retry cannot help


@pytest.mark.parametrize("where", ["gs", "local"])
def test_a_released_claim_passes_at_once_to_the_waiting_writer(where, gcs_bucket, tmp_path):
    run_uri = run_uri_for(where, gcs_bucket, tmp_path)
    with writer.claimed(run_uri, heartbeat_s=0.2, **QUICK):
        waiter, outcome = claim_in_thread(run_uri, wait_s=30)
        time.sleep(0.5)
        assert not outcome
        released = time.monotonic()
    waiter.join(timeout=30)
    assert outcome.get("claim") is not None and outcome["at"] - released < 2


@pytest.mark.parametrize("where", ["gs", "local"])
def test_a_complete_run_is_not_claimed_even_with_a_leftover_claim(where, gcs_bucket, gcs_client,
                                                                  tmp_path):
    run_uri = run_uri_for(where, gcs_bucket, tmp_path)
    storage.publish_tree(staged_run(tmp_path, "A"), run_uri, last=run_files.MANIFEST)
    dead = writer.claimed(run_uri, heartbeat_s=1000, **QUICK)
    dead.__enter__()  # a writer killed after its MANIFEST.json: its claim is left behind
    before = published(run_uri, gcs_client)
    started = time.monotonic()
    with writer.claimed(run_uri, wait_s=30, **QUICK) as claim:
        assert claim is None
    assert time.monotonic() - started < 2 and published(run_uri, gcs_client) == before


def test_a_claim_silent_longer_than_stale_after_is_taken_over(gcs_bucket, gcs_client, tmp_path,
                                                              caplog):
    run_uri = f"gs://{gcs_bucket}/runs/r1"
    dead = writer.claimed(run_uri, heartbeat_s=1000, **QUICK)  # no heartbeat: as if killed
    dead.__enter__()
    started = time.monotonic()
    with writer.claimed(run_uri, wait_s=10, stale_after_s=1.0, **QUICK) as claim:
        assert claim is not None
    assert 1.0 <= time.monotonic() - started < 5
    assert "took over the claim" in caplog.text


def test_a_live_claim_is_never_taken_over(gcs_bucket, tmp_path):
    run_uri = f"gs://{gcs_bucket}/runs/r1"
    with writer.claimed(run_uri, heartbeat_s=0.2, **QUICK):
        with pytest.raises(writer.WrittenElsewhere):
            with writer.claimed(run_uri, wait_s=4.0, stale_after_s=1.5, **QUICK):
                pass


def test_a_writer_whose_claim_was_taken_over_publishes_nothing(gcs_bucket, gcs_client, tmp_path):
    """A writer paused past stale_after (its heartbeat too) comes back to find the run taken."""
    run_uri = f"gs://{gcs_bucket}/runs/r1"
    paused = writer.claimed(run_uri, heartbeat_s=1000, **QUICK)
    first = paused.__enter__()
    with writer.claimed(run_uri, wait_s=10, stale_after_s=0.5, **QUICK) as second:
        writer.publish(second, staged_run(tmp_path, "B"), run_uri)
    with pytest.raises(writer.WrittenElsewhere):
        writer.publish(first, staged_run(tmp_path, "A"), run_uri)
    files = published(run_uri, gcs_client)
    assert b"B " in files["metrics.json"] and assert_matches_its_manifest(files)


def test_a_local_claim_of_a_killed_writer_is_free_at_once(tmp_path):
    run_uri = str(tmp_path / "out" / "r1")
    process = subprocess.Popen([sys.executable, "-m", WRITER, run_uri, str(tmp_path / "s"), "A",
                                "60", "1"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout.readline().strip() == "claimed"
    process.kill()
    process.wait()
    started = time.monotonic()
    with writer.claimed(run_uri, wait_s=5, **QUICK) as claim:
        assert claim is not None
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("where", ["gs", "local"])
def test_sigterm_releases_the_claim_before_exiting_75(where, gcs_bucket, gcs_endpoint, gcs_client,
                                                      tmp_path):
    run_uri = run_uri_for(where, gcs_bucket, tmp_path)
    process = subprocess.Popen([sys.executable, "-m", WRITER, run_uri, str(tmp_path / "s"), "A",
                                "60", "1"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env=job_environment({"STORAGE_EMULATOR_HOST": gcs_endpoint}))
    assert process.stdout.readline().strip() == "claimed"
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert process.wait(timeout=30) == 75
    assert time.monotonic() - sent < 5
    assert not storage.exists(storage.join(run_uri, writer.CLAIM))
    with writer.claimed(run_uri, wait_s=1, **QUICK) as claim:  # the next pod: at once
        assert claim is not None


# --- publishing ---

def test_an_upload_never_lands_over_a_run_completed_after_its_listing(gcs_bucket, gcs_client,
                                                                      gcs_endpoint, tmp_path):
    """Writer B lists the run, then its uploads crawl; A publishes the whole run meanwhile. None
    of B's objects lands over A's complete run (without any claim: the uploads' preconditions)."""
    run_uri = f"gs://{gcs_bucket}/runs/r1"
    staged_b = staged_run(tmp_path, "B")
    with gcs_emulator.FaultyProxy(gcs_endpoint, delay_s=1.0) as slow_link:
        b = subprocess.Popen(
            [sys.executable, "-c", "import storage; from common import run_files; "
             f"storage.publish_tree({str(staged_b)!r}, {run_uri!r}, last=run_files.MANIFEST)"],
            cwd=ROOT, env=job_environment({"STORAGE_EMULATOR_HOST": slow_link.url}),
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not any("/o?" in line and "prefix=" in line for line in slow_link.answered):
            assert time.monotonic() < deadline and b.poll() is None, "B never listed the run"
            time.sleep(0.02)
        storage.publish_tree(staged_run(tmp_path, "A"), run_uri, last=run_files.MANIFEST)
        b_error = b.communicate(timeout=60)[1]
    files = published(run_uri, gcs_client)
    assert_matches_its_manifest(files)
    assert b.returncode != 0 and "Conflict" in b_error and "another writer" in b_error
    assert all(content.startswith(b"A ") for content in files.values() if content[:2] in
               (b"A ", b"B "))


def start_writer(run_uri: str, tmp_path: Path, name: str, train_s: float, endpoint: str,
                 wait_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", WRITER, run_uri, str(tmp_path / f"s-{name}"),
                             name, str(train_s), str(wait_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=job_environment({"STORAGE_EMULATOR_HOST": endpoint}))


@pytest.mark.parametrize("slowed", ["first", "second"])
@pytest.mark.parametrize("where", ["gs", "local"])
def test_two_writers_of_one_run_publish_it_once_and_it_matches_its_manifest(
        where, slowed, gcs_bucket, gcs_client, gcs_endpoint, tmp_path):
    """Started 0.3 s apart; the slowed one trains 3 s (on gs:// through a link adding 0.2 s to
    every request too), the other 0.5 s; whoever waits gives up after 1.5 s."""
    run_uri = run_uri_for(where, gcs_bucket, tmp_path)
    with gcs_emulator.FaultyProxy(gcs_endpoint, delay_s=0.2) as slow_link:
        processes = {}
        for name in ("first", "second"):
            slow = name == slowed
            processes[name] = start_writer(run_uri, tmp_path, name, 3.0 if slow else 0.5,
                                           slow_link.url if slow and where == "gs"
                                           else gcs_endpoint, wait_s=1.5)
            time.sleep(0.3)
        outcomes = {name: (process.wait(timeout=120), *process.communicate())
                    for name, process in processes.items()}
    publishers = [name for name, (code, out, _) in outcomes.items() if "published" in out]
    assert len(publishers) == 1, outcomes
    (other,) = set(outcomes) - set(publishers)
    code, out, err = outcomes[other]
    errors = [line for line in err.splitlines() if " ERROR: " in line]
    assert (code == 2 and len(errors) == 1 and "being written by" in errors[0]) or \
        (code == 0 and out.strip() == "already complete"), outcomes[other]
    files = published(run_uri, gcs_client)
    assert_matches_its_manifest(files)
    assert all(content.startswith(f"{publishers[0]} ".encode()) for content in files.values()
               if b" saved_model/" in content[:40] or content.startswith((b"first ", b"second ")))


def test_every_attempt_stages_its_run_in_an_empty_folder(tmp_path):
    """A killed attempt's half-written files stay behind in the staging folder; the next attempt
    starts from nothing, so they can reach neither its MANIFEST.json nor the published run."""
    leftover = tmp_path / "staging" / "saved_model" / "saved_model.pb.tmp6f1c2d3e4b5a"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"truncated")
    assert list(writer.fresh_staging(tmp_path / "staging").iterdir()) == []


# --- the job itself ---

def test_a_rerun_of_a_complete_run_clears_its_checkpoints_and_leftover_claim(
        gcs_bucket, gcs_client, gcs_endpoint, tmp_path):
    """The first attempt was stopped after its MANIFEST.json landed, before it cleared its
    checkpoints and released its claim; the rerun says "already complete" and clears exactly
    what this RUN_ID recorded writing there."""
    bucket = gcs_client.bucket(gcs_bucket)
    run = {"MANIFEST.json": b'{"files": {}}', "metrics.json": b"{}",
           "checkpoints/notes.txt": b"not the job's: not in WRITTEN.json"}
    checkpoints = [f"phase2-backup/chief/{n}" for n in ("a", "b", "c")] + \
        ["state.json", "phase1.weights.h5"]
    for name in checkpoints:
        bucket.blob(f"runs/r1/checkpoints/{name}").upload_from_string(b"checkpoint")
    bucket.blob("runs/r1/checkpoints/WRITTEN.json").upload_from_string(
        json.dumps({"owner": "r1", "names": checkpoints}))
    for name, content in run.items():
        bucket.blob(f"runs/r1/{name}").upload_from_string(content)
    bucket.blob(f"runs/r1/{writer.CLAIM}").upload_from_string(
        json.dumps({"writer": "gone/1/x", "host": "gone", "pid": 1, "at": 0}))
    started = time.monotonic()
    result = run_in_process("job", {"DATA_URI": str(tmp_path / "never-read"), "OUTPUT_URI":
                                    f"gs://{gcs_bucket}/runs", "RUN_ID": "r1", "WEIGHTS": "none",
                                    "CACHE_DIR": str(tmp_path / "cache"),
                                    "STORAGE_EMULATOR_HOST": gcs_endpoint})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already complete" in result.stderr and time.monotonic() - started < 60
    assert {blob.name: blob.download_as_bytes() for blob in gcs_client.list_blobs(gcs_bucket)} \
        == {f"runs/r1/{name}": content for name, content in run.items()}


def test_a_second_job_of_a_local_run_never_rewrites_it(tmp_path):
    """Two `python -m job` of one RUN_ID and OUTPUT_URI, separate caches, the second started while
    the first trains: the second waits for the first's claim and finds the run complete; the run
    is published once and matches its MANIFEST.json."""
    images = write_class_images(tmp_path / "images", ["a", "b"], per_class=10, size=32)
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}
    settings = {name: tiny_vgg16_settings(images, tmp_path / "out", tmp_path / f"cache-{name}")
                for name in logs}
    started = time.monotonic()
    first = start_job(settings["first"], logs["first"])
    while "strategy:" not in logs["first"].read_text():  # it has claimed the run by then
        assert first.poll() is None and time.monotonic() - started < 300, \
            logs["first"].read_text()[-3000:]
        time.sleep(0.2)
    second = start_job(settings["second"], logs["second"])
    codes = {"first": first.wait(timeout=600), "second": second.wait(timeout=600)}
    texts = {name: path.read_text() for name, path in logs.items()}
    assert codes == {"first": 0, "second": 0}, texts["second"][-3000:]
    assert [name for name, text in texts.items() if "run complete:" in text] == ["first"]
    assert "already complete" in texts["second"] and "being written by pid" in texts["second"]
    assert_matches_its_manifest(published(str(tmp_path / "out" / "tiny")))
    print(f"two local jobs: {time.monotonic() - started:.1f} s")
