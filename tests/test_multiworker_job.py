"""The real job (`python -m job`) on two loopback workers with TF_CONFIG, CPU only: both exit 0,
log the same final weights digest, and only the chief (worker 0) writes the run."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import random_vgg16_weights
from tests.test_multiworker import run_workers, worker_tf_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(170)
@pytest.mark.skipif(not (ROOT / "job" / "train.py").exists(),
                    reason="the training job (job/train.py, branch main) is not here yet")
def test_two_job_workers_train_in_sync_and_only_the_chief_publishes(tmp_path, free_ports,
                                                                   tiny_image_tree, cpu_subprocess_env):
    runs = []
    for index, tf_config in enumerate(worker_tf_configs(free_ports(2))):
        env = {**cpu_subprocess_env, "TF_CONFIG": tf_config, "DATA_URI": str(tiny_image_tree),
               "OUTPUT_URI": str(tmp_path / f"out{index}"), "CACHE_DIR": str(tmp_path / f"cache{index}"),
               "RUN_ID": "mw", "BACKBONE": "vgg16", "WEIGHTS": random_vgg16_weights(), "IMAGE_SIZE": "32",
               "HEAD_EPOCHS": "1", "FINE_TUNE_EPOCHS": "1", "BATCH_SIZE": "4"}
        runs.append(([sys.executable, "-m", "job"], env))
    results = run_workers(runs, timeout=150)
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
        assert "MultiWorkerMirroredStrategy, 2 replica(s) in sync" in result.stderr
    digests = [re.findall(r"weights digest: ([0-9a-f]{64})", r.stderr) for r in results]
    assert len(digests[0]) == 1 and digests[0] == digests[1]
    assert (tmp_path / "out0" / "mw" / "MANIFEST.json").is_file()
    assert not (tmp_path / "out1").exists()
