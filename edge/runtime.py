"""Runtime: the onnxruntime CPU session, the cores to give it, the label a model's output means,
and the exit codes; shared by the edge predictor, the export's measurements and training's metrics.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_session(path: Path | str, threads: int | None = None):
    """An onnxruntime CPU session tuned for latency: every graph optimisation, `threads` intra-op
    threads (default: every available core), one inter-op thread (the graphs are sequential)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict_labels(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices from a model's output: one sigmoid unit (the probability of class index 1,
    decided at threshold), or a softmax row (its largest)."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape[-1] == 1:
        return (probabilities[:, 0] >= threshold).astype(int)
    return probabilities.argmax(axis=-1)
