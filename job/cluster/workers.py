"""Workers: what the workers of a cluster hold and did, joined into the run's one account.

Each worker loads only its shard of the data (job/inputs/shard.py). What metrics.json records of
the whole run comes from joining theirs through the strategy's collectives
(job/cluster/distribute.py): the images per class and split and the files skipped, summed (`WholeData`), and one row per
worker of its shard, its pull and its seconds per phase (`worker_records`). On one machine both
are that machine's own.
"""
from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np

import storage
from job.cluster import distribute
from job.cluster.context import RunContext
from job.inputs import data


@dataclasses.dataclass(frozen=True)
class WholeData:
    """What the whole data set holds when each worker loaded only its shard: images per class
    and split, and the files skipped, summed over the workers (the shard's own on one machine)."""

    counts: dict[str, dict[str, int]]
    skipped: dict[str, str]

    @classmethod
    def of(cls, dataset: data.DataSet, context: RunContext) -> "WholeData":
        if not context.shard.is_partial:
            return cls(dataset.counts(), dataset.skipped)
        strategy, classes = context.strategy, dataset.class_names
        layout = zlib.crc32(json.dumps([classes, dataset.notes]).encode())
        if distribute.smallest(layout, strategy) != distribute.largest(layout, strategy):
            raise data.DataError("DATA_URI: the workers found different "
                                 "classes or split folders in their shards; each class and split "
                                 "folder needs at least as many images as there are workers")
        counts = distribute.total(np.stack([getattr(dataset, name).label_counts(len(classes))
                                            for name in data.SPLITS]), strategy)
        skipped = distribute.gather_texts(
            [f"{path}\t{reason}" for path, reason in dataset.skipped.items()], strategy)
        whole = cls({name: dict(zip(classes, row.tolist())) for name, row in zip(data.SPLITS, counts)},
                    dict(line.split("\t", 1) for line in skipped))
        missing = [name for name, count in whole.counts["train"].items() if count == 0]
        if missing:
            raise data.DataError(f"DATA_URI: class {missing[0]!r} has no usable training image")
        return whole


def worker_records(context: RunContext, dataset: data.DataSet,
                   pulled: storage.TransferStats | None, records: dict[str, dict]) -> list[dict]:
    """Per worker (the chief first): the images of its shard, the objects and bytes it pulled
    (and found already in its cache), how many inputs ran through its frozen layers and its
    seconds per phase (records: each phase's record, by its name). One entry on one machine."""
    mine = {f"{name}_images": len(getattr(dataset, name)) for name in data.SPLITS}
    mine.update({"objects_pulled": pulled.objects if pulled else 0,
                 "bytes_pulled": pulled.bytes if pulled else 0,
                 "objects_already_cached": pulled.cached if pulled else 0})
    for name, record in records.items():
        mine[f"{name}_frozen_layer_inputs"] = record.get("frozen_layer_inputs", 0)
        mine[f"{name}_seconds"] = record.get("seconds", 0.0)
    rows = distribute.gather_rows(np.array([list(mine.values())], np.float64), context.strategy)
    return [{key: (round(value, 2) if key.endswith("seconds") else int(value))
             for key, value in zip(mine, row)} for row in rows]
