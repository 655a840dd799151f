"""One worker of the two-process MultiWorkerMirroredStrategy test (tests/test_multiworker.py).

    TF_CONFIG=... python -m tests.mw_worker OUTPUT_DIR

Trains a small Keras model for a few steps under job.cluster.distribute's strategy, then saves the
weights: the chief into OUTPUT_DIR, any other worker into a throwaway directory it removes.
Prints one JSON line: task, chief, strategy, replicas, global batch size and a digest of the
weights before and after training.
"""
import hashlib
import json
import os
import sys

from job.cluster import distribute


def digest(weights) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(w.tobytes())
    return h.hexdigest()


def main(output_dir: str) -> int:
    tf_config = os.environ.get("TF_CONFIG", "")
    cluster_spec = os.environ.get("CLUSTER_SPEC", "")
    cluster = distribute.parse_cluster(tf_config, cluster_spec)
    strategy = distribute.make_strategy(cluster)
    chief = distribute.is_chief(cluster)

    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(7)
    # Each worker gets different data: only the all-reduce can keep their weights equal.
    task_index = json.loads(tf_config)["task"]["index"] if tf_config else 0
    rng = np.random.default_rng(100 + task_index)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("float32")
    batch = distribute.global_batch_size(8, strategy)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat()

    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    before = digest(model.get_weights())
    model.fit(data, epochs=1, steps_per_epoch=4, verbose=0)
    after = digest(model.get_weights())

    target = distribute.write_dir(output_dir, chief)
    target.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(target / "model.weights.h5"))
    distribute.discard(target, chief)

    print(json.dumps({"task": json.loads(tf_config)["task"] if tf_config else None,
                      "chief": chief, "strategy": type(strategy).__name__,
                      "replicas": strategy.num_replicas_in_sync, "global_batch": batch,
                      "before": before, "after": after}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
