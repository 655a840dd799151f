"""Identity: what makes a run the run it is, so that a rerun of its RUN_ID on other data or
settings is refused (exit 2, naming the difference) instead of being mixed into it or told that
the other data's run is already complete.

A run's identity is DATA_URI, the data's listing (storage/listing.py: how many files and a digest of
their names, sizes and checksums or modification times, without reading an image; of the whole
data set, also on a worker that pulls only its shard) and every setting that changes the trained
model or its published result. It is recorded among the run's checkpoints (FILE, mirrored with
them) and in the complete run's metrics.json (KEY). Before anything else, a rerun compares its
own with every record the run left: metrics.json, the checkpoints' FILE.

Runs recorded before identities were: a complete run's metrics.json still holds its settings
("config"), which are compared (its data listing cannot be); checkpoints with no FILE are resumed
as before, with a warning, and this attempt's identity is recorded from then on.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import storage
from common import run_files
from job.config import Config, ConfigError
from storage import listing, objects

KEY = "identity"  # its key in metrics.json
FILE = "identity.json"  # its file among the checkpoints
DATA_LISTING = ("data_files", "data_listing_digest")
log = logging.getLogger("job")

# The settings a rerun may change, as they change neither what the run trains nor what it
# publishes: where it is written, cached and checkpointed (RUN_ID names the run itself); how
# patient storage calls are; what follows training (EXPORT_ONNX); the machines it runs on, which a
# restart may not choose (TF_CONFIG, CLUSTER_SPEC, as the GPUs MIXED_PRECISION=auto finds); and
# whether the frozen layers' outputs are cached (CACHE_FEATURES, CACHE_BUDGET): CACHE_BUDGET
# already decides that per machine, from its free disk, so a restart on a smaller disk must
# still resume; a tuning trial's id (already in RUN_ID) and the local file its metric is reported
# to (job/results/tuning.py). Every other setting, and any added later, is part of the identity.
NOT_IDENTITY = frozenset({
    "output_uri", "run_id", "cache_dir", "model_uri", "checkpoint_root", "tensorboard_uri",
    "storage_deadline", "export_onnx", "cluster",
    "cache_features", "cache_budget", "trial_id", "hp_metric_file"})


def settings_of(config: Config) -> dict:
    """The settings that are part of a run's identity, by Config field name."""
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
            if field.name not in NOT_IDENTITY}


def of_attempt(config: Config) -> dict:
    """This attempt's identity: its settings and the listing of DATA_URI as it is now."""
    data = listing.of_tree(config.data_uri, retry_deadline=config.storage_deadline)
    return {**settings_of(config), "data_files": data.files, "data_listing_digest": data.digest}


def check_rerun(config: Config) -> dict:
    """This attempt's identity, once compared with what RUN_ID's run recorded: raises ConfigError
    (exit 2) naming each difference, before any data is pulled or checkpoint restored."""
    attempt = of_attempt(config)
    deadline = config.storage_deadline
    metrics = _read_json(storage.join(config.run_uri, run_files.METRICS), deadline)
    if metrics is not None:
        refuse_difference(recorded_in_metrics(metrics), attempt, config.run_id,
                          f"its run at {config.run_uri}")
    checkpointed = _read_json(storage.join(config.checkpoint_uri, FILE), deadline)
    if checkpointed is not None:
        refuse_difference(checkpointed, attempt, config.run_id,
                          f"its checkpoints at {config.checkpoint_uri}")
    return attempt


def hold(checkpoint_dir: Path, attempt: dict, run_id: str) -> None:
    """Once the checkpoints are pulled into checkpoint_dir: refuses them when they record another
    identity; records this attempt's when they record none (the next sync mirrors it)."""
    path = Path(checkpoint_dir, FILE)
    recorded = _read_json(str(path), storage.DEFAULT_RETRY_DEADLINE_S)
    if recorded is not None:
        refuse_difference(recorded, attempt, run_id, "its checkpoints")
        return
    if any(Path(checkpoint_dir).iterdir()):
        log.warning("RUN_ID=%s: its checkpoints record no data or settings (made before runs "
                    "recorded them); resuming them as this attempt's", run_id)
    run_files.write_json(path, attempt)


def recorded_in_metrics(metrics: dict) -> dict:
    """The identity a run's metrics.json records; for a run from before identities, the settings
    of its "config" block (no data listing)."""
    if KEY in metrics:
        return metrics[KEY]
    return {name: value for name, value in metrics.get("config", {}).items()
            if name not in NOT_IDENTITY}


def refuse_difference(recorded: dict, attempt: dict, run_id: str, where: str) -> None:
    """Raises ConfigError, one line, when recorded and attempt differ in a name both hold."""
    differing = [name for name in attempt if name in recorded
                 and _comparable(recorded[name]) != _comparable(attempt[name])]
    if not differing:
        return
    raise ConfigError(f"RUN_ID={run_id}: {where} recorded {describe(recorded, differing)}; "
                      f"this attempt has {describe(attempt, differing)}; a run is trained on one "
                      "data set with one set of settings: use a new RUN_ID")


def describe(identity: dict, names: list[str]) -> str:
    """The named parts of an identity as settings: "DATA_URI=/a (60 files, listing 1a2b3c4d5e6f),
    IMAGE_SIZE=32"; a changed listing shows with DATA_URI."""
    parts = [f"{name.upper()}={identity[name]}" for name in names if name not in DATA_LISTING]
    if any(name in DATA_LISTING for name in names) or "data_uri" in names:
        data = f"DATA_URI={identity['data_uri']}"
        if all(name in identity for name in DATA_LISTING):
            data += (f" ({identity['data_files']} files, listing "
                     f"{identity['data_listing_digest'][:12]})")
        parts = [data] + [part for part in parts if not part.startswith("DATA_URI=")]
    return ", ".join(parts)


def _comparable(value):
    """A value as it reads back from JSON (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=str))


def _read_json(uri: str, deadline: float) -> dict | None:
    """The JSON object at uri; None when there is none, or it is not one (then with a warning:
    an unreadable record cannot be compared)."""
    try:
        content = objects.read(uri, retry_deadline=deadline)
        record = None if content is None else json.loads(content)
    except ValueError as error:
        log.warning("%s: not JSON (%s); the run's identity could not be compared with it", uri,
                    error)
        return None
    return record if isinstance(record, dict) else None
