"""Checkpoints mirrored to CHECKPOINT_URI: what training logs of it."""
import logging

import keras
import numpy as np

from job.training.checkpoint import Checkpoints, StopSignal


def test_checkpoint_syncs_after_each_epoch_are_debug_and_the_phase_end_sync_is_info(tmp_path,
                                                                                    caplog):
    checkpoints = Checkpoints(tmp_path / "ckpt", str(tmp_path / "ckpt-uri"), "r1", StopSignal())
    classifier = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    classifier.compile(optimizer="sgd", loss="mse")
    caplog.set_level(logging.DEBUG, logger="storage")
    classifier.fit(np.zeros((8, 2)), np.zeros(8), epochs=3, verbose=0,
                   callbacks=checkpoints.callbacks("phase 1"))
    during = [record for record in caplog.records if record.getMessage().startswith("synced")]
    checkpoints.finish("phase 1", classifier, {"epochs_run": 3})
    synced = [record for record in caplog.records if record.getMessage().startswith("synced")]
    assert [record.levelno for record in during] == [logging.DEBUG] * 3
    assert [record.levelno for record in synced[len(during):]] == [logging.INFO]
