"""The real job (`python -m job`) on two loopback workers with TF_CONFIG, CPU only: both exit 0,
log the same final weights digest, and only the chief (worker 0) writes the run. On real X-rays in
a bucket on the emulator, each worker pulls and runs through its frozen layers its own half of
the data, and the run scores as the same run on one worker does."""
from __future__ import annotations

import json
import os
import re
import sys
import uuid
from pathlib import Path

import pytest

from devkit.datasets import link_slice
from tests.conftest import run_in_process
from tests.test_multiworker import run_workers, worker_tf_configs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here trains on worker processes


@pytest.mark.timeout(800)
def test_two_job_workers_train_in_sync_and_only_the_chief_publishes(sharded_and_alone):
    """On the sharded run below (each worker given its own OUTPUT_URI, so that one written by
    worker 1 would show); both workers exited 0 there."""
    _, _, logs, outputs = sharded_and_alone
    for log in logs:
        assert "MultiWorkerMirroredStrategy, 2 replica(s) in sync" in log
    digests = [re.findall(r"weights digest: ([0-9a-f]{64})", log) for log in logs]
    assert len(digests[0]) == 1 and digests[0] == digests[1]
    assert (outputs[0] / "sharded" / "MANIFEST.json").is_file()
    assert not outputs[1].exists()


# --- The job itself on two workers: each pulls and runs through its frozen layers half the data.

# Phase 1 is the default linear probe: the same on one worker and on two (the same rows, gathered).
# Phase 2 trains one epoch at 1e-6, in sync across the workers: at the default 1e-5, one epoch on
# 120 images took the one-worker run's test accuracy anywhere from 0.57 to 0.84 depending on the
# batches alone, so no two runs could be compared within 2 points.
SHARDED_SETTINGS = {"BACKBONE": "mobilenet_v2", "ALPHA": "0.35", "IMAGE_SIZE": "96",
                    "FINE_TUNE_EPOCHS": "1", "FINE_TUNE_LEARNING_RATE": "1e-6", "RUN_ID": "sharded"}
PER_REPLICA_BATCH = 16  # two workers: a global batch of 32, as the one worker is given


@pytest.fixture(scope="module")
def xray_bucket(gcs_emulator_url, xray_dir, tmp_path_factory) -> str:
    """gs:// URI of real X-rays on the emulator: 60 training, 30 validation and 100 test images
    per class (200 test images: one flipped label moves accuracy half a point)."""
    import storage

    local = link_slice(xray_dir, tmp_path_factory.mktemp("xray-sharded"),
                       {"train": 60, "validation": 30, "test": 100})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator_url)
        from google.cloud import storage as gcs

        bucket = f"sharded-{uuid.uuid4().hex[:12]}"
        gcs.Client(project="test-project").create_bucket(bucket)
        storage.publish_tree(local, f"gs://{bucket}/xrays")
    return f"gs://{bucket}/xrays"


def job_run(tmp: Path, name: str, data_uri: str, env: dict, batch_size: int,
            tf_config: str | None = None, output: str = "out"):
    """(command, environment) of one `python -m job` process of a run written under tmp/output."""
    settings = {**env, **SHARDED_SETTINGS, "DATA_URI": data_uri, "OUTPUT_URI": str(tmp / output),
                "CACHE_DIR": str(tmp / f"cache-{name}"), "BATCH_SIZE": str(batch_size)}
    if tf_config:
        settings["TF_CONFIG"] = tf_config
    return [sys.executable, "-m", "job"], settings


@pytest.fixture(scope="module")
def sharded_and_alone(tmp_path_factory, xray_bucket, gcs_emulator_url, mobilenet_v2_035_weights,
                      free_ports) -> tuple[dict, dict, list[str], list[Path]]:
    """metrics.json of the same run on two workers and on one, the two workers' logs and the
    OUTPUT_URI each worker was given (the chief's first)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CONFIG", "CLUSTER_SPEC"))}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
               STORAGE_EMULATOR_HOST=gcs_emulator_url, WEIGHTS=str(mobilenet_v2_035_weights))
    two, one = tmp_path_factory.mktemp("two-workers"), tmp_path_factory.mktemp("one-worker")
    outputs = [two / "out0", two / "out1"]
    workers = run_workers([job_run(two, f"worker{index}", xray_bucket, env, PER_REPLICA_BATCH,
                                   tf_config, outputs[index].name)
                           for index, tf_config in enumerate(worker_tf_configs(free_ports(2)))],
                          timeout=420)
    for result in workers:
        assert result.returncode == 0, result.stderr[-4000:]
    _, settings = job_run(one, "alone", xray_bucket, env, 2 * PER_REPLICA_BATCH)
    alone = run_in_process("job", settings)  # in this process: one TensorFlow start fewer
    assert alone.returncode == 0, alone.stderr[-4000:]
    metrics = [json.loads((out / "sharded" / "metrics.json").read_text())
               for out in (outputs[0], one / "out")]
    return metrics[0], metrics[1], [result.stderr for result in workers], outputs


@pytest.mark.timeout(800)
def test_each_of_two_workers_pulls_and_extracts_half_of_the_training_images(sharded_and_alone):
    sharded, *_ = sharded_and_alone
    workers = sharded["workers"]
    assert len(workers) == 2 and sharded["record"]["data_shards"] == 2
    total = sum(worker["train_images"] for worker in workers)
    assert total == 120
    for worker in workers:
        assert abs(worker["train_images"] - total / 2) <= 0.05 * total / 2
        assert worker["objects_pulled"] == sum(worker[f"{name}_images"]
                                               for name in ("train", "validation", "test"))
        # Phase 1 (the probe) runs the unaugmented images, validation and test through the
        # frozen layers once; phase 2 two augmented views of its training images.
        assert worker["phase1_frozen_layer_inputs"] == (
            worker["train_images"] + worker["validation_images"] + worker["test_images"])
    assert sum(worker["objects_pulled"] for worker in workers) == 120 + 60 + 200


def test_two_workers_end_with_the_same_weights(sharded_and_alone):
    _, _, logs, _ = sharded_and_alone
    digests = [line.rsplit(" ", 1)[-1] for log in logs for line in log.splitlines()
               if "weights digest:" in line]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_two_workers_score_the_whole_test_split_as_one_worker_does(sharded_and_alone):
    sharded, alone, *_ = sharded_and_alone
    assert sharded["class_counts"] == alone["class_counts"]
    assert sharded["test"]["accuracy"] == pytest.approx(alone["test"]["accuracy"], abs=0.02)
    assert sum(sharded["class_counts"]["test"].values()) == 200
