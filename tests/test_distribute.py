"""job/cluster/distribute.py and job/cluster/tfconfig.py: strategy choice, chief, batch size and TF_CONFIG, as
pure functions (no TensorFlow started). tests/test_multiworker.py runs real workers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from job.cluster import distribute, tfconfig
from job.config import Config, ConfigError
from job.inputs.shard import EVERYTHING, Shard

ROOT = Path(__file__).resolve().parents[1]


def tf_config(workers: int, index: int = 0, task_type: str = "worker", chief: bool = False) -> str:
    cluster = {"worker": [f"w{i}:2222" for i in range(workers)]}
    if chief:
        cluster["chief"] = ["c0:2222"]
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def vertex_cluster_spec(workers: int, pool: str = "workerpool0", index: int = 0) -> str:
    cluster = {"workerpool0": ["chief-0:2222"]}
    if workers > 1:
        cluster["workerpool1"] = [f"worker-{i}:2222" for i in range(workers - 1)]
    return json.dumps({"cluster": cluster, "environment": "cloud",
                       "task": {"type": pool, "index": index}, "job": "{}"})


def cluster(tf_config_text: str, cluster_spec: str = ""):
    """The parsed cluster, as job/config.py hands it on."""
    return distribute.parse_cluster(tf_config_text, cluster_spec)


def test_several_workers_in_tf_config_choose_multi_worker_mirrored():
    assert distribute.choose_strategy(cluster(tf_config(2, index=1)), gpu_count=1) == distribute.MULTI_WORKER


def test_several_workers_in_vertex_cluster_spec_choose_multi_worker_mirrored():
    assert distribute.choose_strategy(cluster("", vertex_cluster_spec(3, "workerpool1", 1)), 0) == distribute.MULTI_WORKER


def test_one_machine_with_several_gpus_chooses_mirrored():
    assert distribute.choose_strategy(cluster(tf_config(1)), gpu_count=4) == distribute.MIRRORED
    assert distribute.choose_strategy(cluster(""), gpu_count=2) == distribute.MIRRORED


def test_one_machine_with_one_gpu_or_none_chooses_the_default_strategy():
    assert distribute.choose_strategy(cluster(""), gpu_count=1) == distribute.DEFAULT
    assert distribute.choose_strategy(cluster(""), gpu_count=0) == distribute.DEFAULT


def test_vertex_cluster_spec_converts_to_tf_config_with_workerpool0_as_chief():
    converted = json.loads(distribute.tf_config_from_cluster_spec(vertex_cluster_spec(3, "workerpool1", 1)))
    assert converted == {"cluster": {"chief": ["chief-0:2222"], "worker": ["worker-0:2222", "worker-1:2222"]},
                         "task": {"type": "worker", "index": 1}}


def test_tf_config_wins_over_cluster_spec_when_both_are_set():
    cluster = distribute.parse_cluster(tf_config(2, index=1), vertex_cluster_spec(3))
    assert (cluster.task_type, cluster.task_index, cluster.num_workers) == ("worker", 1, 2)


@pytest.mark.parametrize("config, spec, chief", [
    ("", "", True),                                      # alone
    (tf_config(2, 0), "", True),                         # worker 0 of a cluster without a chief
    (tf_config(2, 1), "", False),
    (tf_config(2, 0, chief=True), "", False),            # a chief exists: worker 0 is not it
    (tf_config(2, 0, "chief", chief=True), "", True),
    ("", vertex_cluster_spec(3, "workerpool0", 0), True),
    ("", vertex_cluster_spec(3, "workerpool1", 0), False),
])
def test_only_the_chief_writes_outputs(config, spec, chief):
    assert distribute.is_chief(cluster(config, spec)) is chief


def test_each_training_task_gets_its_own_shard_of_the_data_the_chief_first():
    assert [cluster(tf_config(3, index)).shard for index in range(3)] == [
        Shard(0, 3), Shard(1, 3), Shard(2, 3)]
    with_chief = [cluster(tf_config(2, 0, "chief", chief=True))] + [
        cluster(tf_config(2, index, chief=True)) for index in range(2)]
    assert [c.shard for c in with_chief] == [Shard(0, 3), Shard(1, 3), Shard(2, 3)]


def test_a_process_alone_loads_all_the_data():
    assert cluster(tf_config(1)).shard == EVERYTHING


def test_global_batch_size_scales_with_replicas_in_sync():
    class FourReplicas:
        num_replicas_in_sync = 4

    assert distribute.global_batch_size(32, FourReplicas()) == 128


def test_non_chief_writes_into_a_throwaway_directory_it_removes(tmp_path):
    assert distribute.write_dir(tmp_path / "out", chief=True) == tmp_path / "out"
    scratch = distribute.write_dir(tmp_path / "out", chief=False)
    assert scratch.is_dir() and tmp_path not in scratch.parents
    distribute.discard(scratch, chief=False)
    assert not scratch.exists()


@pytest.mark.parametrize("name, value", [("TF_CONFIG", "{not json"), ("TF_CONFIG", tf_config(2, index=5)),
                                         ("CLUSTER_SPEC", '{"cluster": {"workerpool9": []}}')])
def test_a_bad_cluster_description_is_a_configuration_error(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({"DATA_URI": "data", name: value})


def test_config_reads_tf_config_and_cluster_spec_from_the_environment():
    assert Config.from_env({"DATA_URI": "data", "TF_CONFIG": tf_config(2, index=1),
                            "CLUSTER_SPEC": vertex_cluster_spec(3)}).cluster == cluster(tf_config(2, index=1))
    assert Config.from_env({"DATA_URI": "data", "CLUSTER_SPEC": vertex_cluster_spec(3, "workerpool1", 1)}).cluster \
        == cluster("", vertex_cluster_spec(3, "workerpool1", 1))
    assert Config.from_env({"DATA_URI": "data"}).cluster is None


def test_indexed_job_worker_gets_tf_config_from_its_completion_index():
    env = {"TFCONFIG_JOB_NAME": "train-x", "TFCONFIG_SERVICE": "workers", "TFCONFIG_WORKERS": "3",
           "TFCONFIG_PORT": "2222", "JOB_COMPLETION_INDEX": "2"}
    assert json.loads(tfconfig.tf_config_from_env(env)) == {
        "cluster": {"worker": ["train-x-0.workers:2222", "train-x-1.workers:2222", "train-x-2.workers:2222"]},
        "task": {"type": "worker", "index": 2}}


def test_tfconfig_wrapper_sets_tf_config_and_runs_the_command(tmp_path):
    env = {"TFCONFIG_JOB_NAME": "j", "TFCONFIG_SERVICE": "s", "TFCONFIG_WORKERS": "2",
           "JOB_COMPLETION_INDEX": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "job.cluster.tfconfig", sys.executable, "-c",
                             "import os; print(os.environ['TF_CONFIG'])"],
                            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["task"] == {"type": "worker", "index": 1}


def test_tfconfig_wrapper_exits_2_on_a_missing_setting():
    result = subprocess.run([sys.executable, "-m", "job.cluster.tfconfig", "true"],
                            env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 2
    assert "TFCONFIG_JOB_NAME is required" in result.stderr
