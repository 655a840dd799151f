"""Two workers on loopback, MultiWorkerMirroredStrategy on CPU: both finish, their weights agree,
and only the chief writes outputs. Each worker trains on different data, so equal weights can only
come from the all-reduce."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = "tests.mw_worker"  # run with `python -m` from the repository root (cwd=ROOT below)
pytestmark = pytest.mark.slow  # every test here trains on worker processes


def worker_tf_configs(ports: list[int]) -> list[str]:
    hosts = [f"127.0.0.1:{port}" for port in ports]
    return [json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})
            for i in range(len(hosts))]


def run_workers(commands_and_envs, timeout: float) -> list[subprocess.CompletedProcess]:
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT) for command, env in commands_and_envs]
    results = []
    try:
        for command_env, process in zip(commands_and_envs, processes):
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command_env[0], process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


@pytest.mark.timeout(170)
def test_two_workers_train_in_sync_and_only_the_chief_writes(tmp_path, free_ports, cpu_subprocess_env):
    outputs = [tmp_path / "worker0", tmp_path / "worker1"]
    runs = [([sys.executable, "-m", WORKER, str(out)], {**cpu_subprocess_env, "TF_CONFIG": tf_config})
            for out, tf_config in zip(outputs, worker_tf_configs(free_ports(2)))]
    results = run_workers(runs, timeout=150)
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert [r["strategy"] for r in reports] == ["MultiWorkerMirroredStrategy"] * 2
    assert [r["replicas"] for r in reports] == [2, 2]
    assert [r["global_batch"] for r in reports] == [16, 16]
    assert reports[0]["after"] == reports[1]["after"] != reports[0]["before"]
    assert [r["chief"] for r in reports] == [True, False]
    assert (outputs[0] / "model.weights.h5").is_file()
    assert not outputs[1].exists()
