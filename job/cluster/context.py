"""Context: what one process of a run is and where it works, decided once, at start.

Built from the parsed cluster before any other TensorFlow op (MultiWorkerMirroredStrategy must
come first): the tf.distribute strategy, whether this process is the chief (the one process that
writes the run, its checkpoints and its caches), its shard of the data (job/inputs/shard.py), and its
local folders. A worker that is not the
chief runs every save too (collective ops inside saving must run on all workers) but into
throwaway folders, which `discard_throwaways` removes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from job.cluster import distribute
from job.config import Config
from job.inputs.shard import EVERYTHING, Shard


@dataclasses.dataclass(frozen=True)
class RunContext:
    strategy: object  # a tf.distribute.Strategy
    chief: bool
    run_dir: Path  # the run's files, staged here (emptied each attempt), then published to run_uri
    checkpoint_dir: Path  # the checkpoints, mirrored to Config.checkpoint_uri
    scratch_dir: Path  # decoded images and cached features, kept until the run is complete
    shard: Shard = EVERYTHING  # the part of the data this process pulls and runs (job/inputs/shard.py)
    claim: object = None  # the chief's claim on the run (job/results/writer.py), once it holds one

    @classmethod
    def create(cls, config: Config) -> "RunContext":
        strategy = distribute.make_strategy(config.cluster)
        chief = distribute.is_chief(config.cluster)
        cache, run_id = config.cache_dir, config.run_id
        return cls(
            strategy=strategy, chief=chief,
            # Staged in the cache even for a local OUTPUT_URI: written in place, a second
            # process rewrote a complete run there, and a killed attempt's partial files stayed.
            run_dir=distribute.write_dir(cache / "staging" / run_id, chief),
            checkpoint_dir=distribute.write_dir(cache / "checkpoints" / run_id, chief),
            scratch_dir=distribute.write_dir(cache / "scratch" / run_id, chief),
            shard=config.cluster.shard if config.cluster else EVERYTHING)

    @property
    def role(self) -> str:
        role = "chief" if self.chief else "worker (writes nothing)"
        return f"{role}, data shard {self.shard.describe()}" if self.shard.is_partial else role

    def discard_throwaways(self) -> None:
        """A worker's folders, once its part is done; the chief's stay."""
        for folder in (self.run_dir, self.checkpoint_dir, self.scratch_dir):
            distribute.discard(folder, self.chief)
