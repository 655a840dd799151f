"""Checkpoints: what a preempted or killed run leaves behind, and how a restart picks it up.

While a phase trains, Keras' BackupAndRestore keeps its weights, optimizer state and epoch after
every epoch; a finished phase leaves its weights and its record in state.json, so a restart with
the same RUN_ID never redoes it. SIGTERM (Kubernetes preemption or eviction) stops training at the
end of the current step, saves, and ends the job with EXIT_PREEMPTED (75, edge.exit_codes), which
is safe to retry. Everything lives in a folder of the job's cache, mirrored after each save to the
run's checkpoint prefix (CHECKPOINT_URI/RUN_ID), where clearing removes only the files this run
recorded writing.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import keras

import storage
from common import run_files
from storage import diskspace

if TYPE_CHECKING:
    from job.training.phases import Phase

log = logging.getLogger("job")


class Preempted(Exception):
    """SIGTERM arrived; the state to resume from is saved."""


class StopSignal:
    """Turns SIGTERM into a request that training honours at the end of the current step."""

    def __init__(self):
        self.requested = threading.Event()
        self.training = False  # outside fit() there is no step to finish: stop at once

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested.set()
        if not self.training:
            raise Preempted("SIGTERM outside training; finished phases stay checkpointed")
        log.warning("SIGTERM: stopping at the end of the current step to save a checkpoint")


class Checkpoints:
    """The checkpoint directory of one run: a folder of the job's cache, mirrored to the run's
    own checkpoint prefix (`Config.checkpoint_uri`), where the job deletes only what it recorded
    writing (storage.sync_owned).

    Every worker of a multi-worker run restores from the URI; only the writer (the chief)
    mirrors its saves back to it. A phase's files take its name ("phase1.weights.h5"); state.json
    keys its record as logs write the phase ("phase 1"): both as earlier runs wrote them, so
    those resume.
    """

    def __init__(self, local_dir: Path, uri: str, run_id: str, stop: StopSignal,
                 writer: bool = True, retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S):
        self.local_dir, self.uri, self.run_id = Path(local_dir), uri, run_id
        self.stop, self.writer, self.retry_deadline = stop, writer, retry_deadline
        self.local_dir.mkdir(parents=True, exist_ok=True)
        storage.pull_owned(uri, self.local_dir, run_id, retry_deadline=retry_deadline)
        state_file = self.local_dir / "state.json"
        self.state = json.loads(state_file.read_text()) if state_file.exists() else {"phases": {}}

    def finished(self, phase: Phase) -> dict | None:
        """The record of a phase that a previous attempt finished, or None."""
        return self.state["phases"].get(str(phase))

    def restore(self, phase: Phase, model: keras.Model) -> None:
        """Loads the weights a finished phase left."""
        model.load_weights(self.local_dir / f"{phase.name}.weights.h5")
        log.info("%s: finished by an earlier attempt; its weights are restored", phase)

    def finish(self, phase: Phase, model: keras.Model, record: dict) -> None:
        """Keeps a finished phase's weights and record, then drops its in-progress backup."""
        with diskspace.writing(self.local_dir, diskspace.weights_file_bytes(model),
                               f"{phase}'s weights"):
            model.save_weights(self.local_dir / f"{phase.name}.weights.h5")
        self.state["phases"][str(phase)] = record
        run_files.write_json(self.local_dir / "state.json", self.state)
        shutil.rmtree(self._backup_dir(phase), ignore_errors=True)
        self.sync()

    def callbacks(self, phase: Phase) -> list[keras.callbacks.Callback]:
        """Saves after every epoch and on SIGTERM; restores the phase in progress when fit starts."""
        return [EpochHistory(self._history_file(phase)),
                PreemptibleBackup(self._backup_dir(phase), self)]

    def history_so_far(self, phase: Phase) -> dict[str, list[float]]:
        """Per-epoch metrics of the epochs of this phase that a previous attempt saved."""
        metadata = self._backup_dir(phase) / "training_metadata.json"
        history_file = self._history_file(phase)
        if not metadata.exists() or not history_file.exists():
            return {}
        epochs_saved = json.loads(metadata.read_text())["epoch"]
        history = json.loads(history_file.read_text())
        if epochs_saved:
            log.info("%s: resuming at epoch %d from the checkpoint", phase, epochs_saved + 1)
        return {key: values[:epochs_saved] for key, values in history.items()}

    def sync(self, quiet: bool = False) -> None:
        """Mirrors the folder to the URI (the writer only). quiet: the sync after every epoch,
        whose summary is a DEBUG line; the phase's last (finish) and SIGTERM's stay INFO."""
        if self.writer:
            storage.sync_owned(self.local_dir, self.uri, self.run_id, quiet=quiet,
                               retry_deadline=self.retry_deadline)

    def clear(self) -> None:
        """Removes this run's checkpoints once the run is complete: the local folder, and at the
        URI exactly the files this run recorded writing there."""
        shutil.rmtree(self.local_dir, ignore_errors=True)
        if self.writer:
            storage.clear_owned(self.uri, self.run_id, retry_deadline=self.retry_deadline)

    def _backup_dir(self, phase: Phase) -> Path:
        return self.local_dir / f"{phase.name}-backup"

    def _history_file(self, phase: Phase) -> Path:
        return self.local_dir / f"{phase.name}-history.json"


class PreemptibleBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that also saves and stops at the end of the step in which SIGTERM arrived.

    The interrupted epoch is saved as not yet done, so the restart runs it again from the weights
    it had reached, and the number of epochs trained in all equals the configured number.
    """

    def __init__(self, backup_dir: Path, checkpoints: Checkpoints):
        super().__init__(str(backup_dir), double_checkpoint=True, delete_checkpoint=False)
        self.checkpoints = checkpoints

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.checkpoints.stop.training = True

    def on_train_end(self, logs=None):
        self.checkpoints.stop.training = False
        super().on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def _save_model(self):
        # h5py crashes the process on a full disk: the space is checked first. The save copies
        # the last one aside and rewrites it, so it needs at most one weights file more.
        diskspace.require(self.backup_dir, diskspace.weights_file_bytes(self.model),
                          "the checkpoint of the epoch")
        super()._save_model()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.checkpoints.sync(quiet=True)  # one INFO line per phase: finish()'s

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self._stop_if_requested()

    def on_test_batch_end(self, batch, logs=None):
        self._stop_if_requested()

    def _stop_if_requested(self):
        if self.checkpoints.stop.requested.is_set():
            self._save_model()
            self.checkpoints.sync()
            self.checkpoints.stop.training = False
            raise Preempted(f"SIGTERM during epoch {self._current_epoch + 1}; checkpoint saved")


class EpochHistory(keras.callbacks.Callback):
    """Appends each epoch's metrics to a JSON file, so a resumed phase reports all its epochs."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        history = json.loads(self.path.read_text()) if self.path.exists() else {}
        for key, value in (logs or {}).items():
            values = history.setdefault(key, [])
            del values[epoch:]
            values.append(float(value))
        run_files.write_json(self.path, history)

