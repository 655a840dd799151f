"""Checkpoints mirrored to CHECKPOINT_URI: what training logs of it, and the names it keeps."""
import json
import logging

import keras
import numpy as np

from job.training.checkpoint import Checkpoints, StopSignal
from job.training.phases import Phase

PHASE_1 = Phase(1, epochs=3, learning_rate=1e-3, fine_tunes=False, augmentation_seed=0)


def compiled_model():
    classifier = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    classifier.compile(optimizer="sgd", loss="mse")
    return classifier


def test_checkpoint_syncs_after_each_epoch_are_debug_and_the_phase_end_sync_is_info(tmp_path,
                                                                                    caplog):
    checkpoints = Checkpoints(tmp_path / "ckpt", str(tmp_path / "ckpt-uri"), "r1", StopSignal())
    classifier = compiled_model()
    caplog.set_level(logging.DEBUG, logger="storage")
    classifier.fit(np.zeros((8, 2)), np.zeros(8), epochs=3, verbose=0,
                   callbacks=checkpoints.callbacks(PHASE_1))
    during = [record for record in caplog.records if record.getMessage().startswith("synced")]
    checkpoints.finish(PHASE_1, classifier, {"epochs_run": 3})
    synced = [record for record in caplog.records if record.getMessage().startswith("synced")]
    assert [record.levelno for record in during] == [logging.DEBUG] * 3
    assert [record.levelno for record in synced[len(during):]] == [logging.INFO]


def test_a_finished_phase_is_kept_under_the_names_earlier_runs_resume_from(tmp_path):
    """state.json keys the record "phase 1" and the weights file is phase1.weights.h5, as every
    earlier run wrote them: a run checkpointed before resumes with this code."""
    checkpoints = Checkpoints(tmp_path / "ckpt", str(tmp_path / "ckpt-uri"), "r1", StopSignal())
    checkpoints.finish(PHASE_1, compiled_model(), {"epochs_run": 3})
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state == {"phases": {"phase 1": {"epochs_run": 3}}}
    assert (tmp_path / "ckpt" / "phase1.weights.h5").exists()
    again = Checkpoints(tmp_path / "ckpt-2", str(tmp_path / "ckpt-uri"), "r1", StopSignal())
    assert again.finished(PHASE_1) == {"epochs_run": 3}
    again.restore(PHASE_1, compiled_model())
