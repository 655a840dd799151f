"""Distribute: which tf.distribute strategy a run uses, and which replica publishes outputs.

job/config.py parses TF_CONFIG and CLUSTER_SPEC once (`parse_cluster`) into `Config.cluster`;
everything else here takes that parsed Cluster, and nothing reads the environment.

- TF_CONFIG (Kubernetes, see job/cluster/tfconfig.py; also set by Vertex AI) or Vertex AI's CLUSTER_SPEC
  (converted to TF_CONFIG form) naming more than one worker -> MultiWorkerMirroredStrategy;
- otherwise more than one visible GPU -> MirroredStrategy;
- otherwise the default strategy (one device; no-op scope).

Only the chief writes outputs. The other workers still run every save (collective ops inside
saving must run on all of them) but into throwaway directories (job/cluster/context.py), as in
TensorFlow's multi-worker Keras guide.

Each worker of a cluster holds only its shard of the data (job/inputs/shard.py). What must be whole on
every worker is joined through the strategy's own collective operations (gather_rows, total,
gather_texts, from_chief), never through files or a channel of the job's own; every worker makes
the same calls in the same order, as collectives need.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from job.inputs.shard import EVERYTHING, Shard

MULTI_WORKER = "multi_worker_mirrored"
MIRRORED = "mirrored"
DEFAULT = "default"

# Vertex AI's worker pools, in TF_CONFIG's task types (Vertex AI documents the same mapping).
VERTEX_POOLS = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps",
                "workerpool3": "evaluator"}
# Task types that take part in MultiWorkerMirroredStrategy's all-reduce.
TRAINING_TASKS = ("chief", "worker")


class ClusterError(ValueError):
    """TF_CONFIG or CLUSTER_SPEC is not a cluster description the job can use."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A parsed TF_CONFIG: addresses per task type, and this process's task."""

    spec: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        return sum(len(self.spec.get(t, [])) for t in TRAINING_TASKS)

    @property
    def chief(self) -> tuple[str, int]:
        return ("chief", 0) if self.spec.get("chief") else ("worker", 0)

    @property
    def shard(self) -> Shard:
        """This process's share of the data (job/inputs/shard.py): the training tasks in order, the chief
        first; everything for a process alone or one that does not train."""
        tasks = [(kind, index) for kind in TRAINING_TASKS
                 for index in range(len(self.spec.get(kind, [])))]
        this = (self.task_type, self.task_index)
        if len(tasks) < 2 or this not in tasks:
            return EVERYTHING
        return Shard(tasks.index(this), len(tasks))


def tf_config_from_cluster_spec(cluster_spec: str) -> str:
    """Vertex AI's CLUSTER_SPEC ({"cluster": {"workerpool0": [...]}, "task": {"type":
    "workerpool1", "index": 0}, ...}) as TF_CONFIG: workerpool0 -> chief, 1 -> worker, ..."""
    data = _load(cluster_spec, "CLUSTER_SPEC")
    try:
        cluster = {VERTEX_POOLS[pool]: list(hosts) for pool, hosts in data["cluster"].items() if hosts}
        task = {"type": VERTEX_POOLS[data["task"]["type"]], "index": int(data["task"]["index"])}
    except (KeyError, TypeError, ValueError) as error:
        raise ClusterError(f"CLUSTER_SPEC is not a Vertex AI cluster spec: {error!r}") from None
    return json.dumps({"cluster": cluster, "task": task})


def parse_cluster(tf_config: str = "", cluster_spec: str = "") -> Cluster | None:
    """The cluster this process is part of, or None when it runs alone. TF_CONFIG wins when both
    are set (Vertex AI sets both, consistently)."""
    if not tf_config.strip() and cluster_spec.strip():
        tf_config = tf_config_from_cluster_spec(cluster_spec)
    if not tf_config.strip():
        return None
    data = _load(tf_config, "TF_CONFIG")
    try:
        spec = {str(kind): [str(h) for h in hosts] for kind, hosts in data["cluster"].items()}
        task = data.get("task") or {}
        cluster = Cluster(spec=spec, task_type=str(task.get("type", "worker")),
                          task_index=int(task.get("index", 0)))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ClusterError(f"TF_CONFIG is not a cluster description: {error!r}") from None
    if cluster.task_type not in spec or not 0 <= cluster.task_index < len(spec[cluster.task_type]):
        raise ClusterError(
            f"TF_CONFIG task {cluster.task_type}:{cluster.task_index} is not in its cluster {spec}")
    return cluster


def choose_strategy(cluster: Cluster | None, gpu_count: int = 0) -> str:
    """Pure: MULTI_WORKER, MIRRORED or DEFAULT for this cluster and GPU count."""
    if cluster is not None and cluster.num_workers > 1:
        return MULTI_WORKER
    if gpu_count > 1:
        return MIRRORED
    return DEFAULT


def make_strategy(cluster: Cluster | None):
    """The tf.distribute strategy choose_strategy picks for this process. Call it once, before
    any other TensorFlow work: MultiWorkerMirroredStrategy must be created first."""
    import tensorflow as tf

    kind = choose_strategy(cluster, len(tf.config.list_physical_devices("GPU")))
    if kind == MULTI_WORKER:
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster.spec), task_type=cluster.task_type,
            task_id=cluster.task_index, rpc_layer="grpc")
        return _multi_worker_strategy_class(tf)(cluster_resolver=resolver)
    if kind == MIRRORED:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def predict(model, dataset, strategy):
    """model.predict(dataset), except across workers: there each worker runs its data set
    through its own (identical, all-reduced) copy of the model, in order, with no collective
    operation, so workers may hold different numbers of batches (gather_rows joins them). Keras's
    multi-worker predict shards the data across workers and gathers the pieces, which would not
    keep rows aligned with the labels the caller holds."""
    if not is_multi_worker(strategy):
        return model.predict(dataset, verbose=0)
    import numpy as np
    import tensorflow as tf

    step = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    batches = [step(images).numpy() for images, *_ in dataset]
    return np.concatenate(batches) if batches else np.zeros((0, *model.output_shape[1:]), "float32")


def per_worker(dataset, strategy):
    """The data set as fit() takes it from a worker that feeds its own shard: its batches go to
    this worker's replicas as they are, neither split across the workers nor re-batched
    (tf.distribute's distribute_datasets_from_function)."""
    return strategy.distribute_datasets_from_function(lambda input_context: dataset)


def smallest(value: int, strategy) -> int:
    """The smallest of each worker's value (one all-gather across the workers); value itself on
    one machine. For a decision every worker makes from what it measures of its own machine, but
    that must come out alike on all of them, as the all-reduce of training needs."""
    if not is_multi_worker(strategy):
        return value
    import tensorflow as tf

    values = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([value], tf.float64))
    return int(tf.reduce_min(strategy.gather(values, axis=0)))


def largest(value: int, strategy) -> int:
    """The largest of each worker's value; value itself on one machine."""
    return -smallest(-value, strategy)


def gather_rows(array, strategy):
    """Every worker's rows of an array, worker by worker (the chief's first), on every worker;
    the array itself on one machine. Workers may hold different numbers of rows; the other
    dimensions must agree. For what each worker computed on its shard of the data (job/inputs/shard.py)
    that every worker needs whole, such as the probabilities a phase is scored by."""
    if not is_multi_worker(strategy):
        return array
    import tensorflow as tf

    if total(len(array), strategy) == 0:  # an all-gather of nothing crashes the process
        return array
    rows = tf.constant(array)
    value = _from_each_worker(strategy, rows, rows[:0])
    return strategy.gather(value, axis=0).numpy()


def total(array, strategy):
    """The sum over the workers of each one's array (of one shape on all); the array itself on
    one machine."""
    if not is_multi_worker(strategy):
        return array
    import tensorflow as tf

    values = tf.constant(array)
    summed = strategy.reduce(tf.distribute.ReduceOp.SUM,
                             _from_each_worker(strategy, values, tf.zeros_like(values)), axis=None)
    return summed.numpy()


def from_chief(arrays: list, chief: bool, strategy) -> list:
    """The chief's arrays, on every worker: for a result that is computed (or could come out a
    little differently) on each worker but must be one and the same for all, such as the
    weights of a probe fitted by a solver."""
    import numpy as np

    return [total(array if chief else np.zeros_like(array), strategy) for array in arrays]


def gather_texts(texts: list[str], strategy) -> list[str]:
    """gather_rows for strings (collective operations move numbers only: each string travels as
    its UTF-8 bytes, padded with NUL, which no file name the job accepts contains)."""
    if not is_multi_worker(strategy):
        return list(texts)
    import numpy as np

    encoded = [text.encode() for text in texts]
    width = largest(max(map(len, encoded), default=0), strategy)
    array = np.zeros((len(encoded), max(width, 1)), np.int32)  # what collectives move
    for row, data in zip(array, encoded):
        row[:len(data)] = np.frombuffer(data, np.uint8)
    return [bytes(row.astype(np.uint8)).rstrip(b"\0").decode()
            for row in gather_rows(array, strategy)]


def _from_each_worker(strategy, value, nothing):
    """A distributed value: value from the first replica of each worker, nothing from the others
    (a worker with several GPUs has one replica on each, all holding the same host value)."""
    local = len(strategy.extended.worker_devices)
    return strategy.experimental_distribute_values_from_function(
        lambda context: value if context.replica_id_in_sync_group % local == 0 else nothing)


def weights_digest(model) -> str:
    """sha256 of a model's weights, equal on every worker when they train in sync (logged)."""
    import hashlib

    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(weights.tobytes())
    return digest.hexdigest()


def _multi_worker_strategy_class(tf):
    """MultiWorkerMirroredStrategy whose reduce() takes what Keras 3's fit() gives it.

    Keras 3 (3.15.1 with TF 2.21) calls strategy.reduce() in two ways MultiWorkerMirroredStrategy
    rejects, so model.fit() fails on it out of the box (keras-team/keras#20585,
    tensorflow/tensorflow#72388):
    - on the first (x, y) batch, a tuple, to build the model: "Attempt to convert a value
      (PerReplica...) to a Tensor". MirroredStrategy reduces nested values element by element;
      so does this.
    - on every step's logs, scalars, with axis=0: "Invalid reduction dimension 0 for input with 0
      dimensions". Keras means the mean across replicas there (what it computes for the other
      strategies), which for a scalar is reduce() with axis=None.
    """

    def rank(value):
        if isinstance(value, tf.distribute.DistributedValues):
            value = value.values[0]
        shape = getattr(value, "shape", None)
        return None if shape is None else shape.rank

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            parent = super()

            def one(v):
                if v is None:
                    return None
                return parent.reduce(reduce_op, v, None if rank(v) == 0 else axis)

            return tf.nest.map_structure(one, value)

    return MultiWorkerMirroredStrategy


def global_batch_size(per_replica: int, strategy) -> int:
    """The batch size to give tf.data / fit: per-replica batch times the replicas in sync."""
    return int(per_replica) * int(strategy.num_replicas_in_sync)


def is_chief(cluster: Cluster | None) -> bool:
    """True for the one process that writes outputs: a process alone, the `chief` task, or worker 0
    of a cluster without a chief. Evaluators and parameter servers are not."""
    if cluster is None:
        return True
    return (cluster.task_type, cluster.task_index) == cluster.chief


def write_dir(local_dir: Path | str, chief: bool) -> Path:
    """Where this process writes: local_dir for the chief, a fresh temporary directory for the
    others (remove it with discard() when done)."""
    if chief:
        return Path(local_dir)
    return Path(tempfile.mkdtemp(prefix="non-chief-"))


def discard(path: Path | str, chief: bool) -> None:
    """Removes a non-chief's throwaway directory; does nothing for the chief."""
    if not chief:
        shutil.rmtree(path, ignore_errors=True)


def _load(text: str, name: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ClusterError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ClusterError(f"{name} must be a JSON object")
    return data
