"""job/inputs/shard.py: how the files of a data set are dealt out to the workers of a cluster."""
from __future__ import annotations

import collections

import pytest

from job.inputs.shard import EVERYTHING, Shard

NAMES = [f"{split}/{label}/{label}-{number}.jpeg" for split, count in
         (("train", 101), ("validation", 13), ("test", 7)) for label in ("cat", "dog", "fox")
         for number in range(count)]


def deal(count: int, names=NAMES, seed: int = 42) -> list[set[str]]:
    return [Shard(index, count).select(names, seed) for index in range(count)]


@pytest.mark.parametrize("count", [2, 3, 8])
def test_every_file_goes_to_exactly_one_worker(count):
    shards = deal(count)
    assert set().union(*shards) == set(NAMES)
    assert sum(map(len, shards)) == len(NAMES)


@pytest.mark.parametrize("count", [2, 3, 8])
def test_each_worker_gets_its_share_of_every_folder_within_one_file(count):
    for shard in deal(count):
        per_folder = collections.Counter(name.rpartition("/")[0] for name in shard)
        for folder, size in collections.Counter(n.rpartition("/")[0] for n in NAMES).items():
            assert abs(per_folder[folder] - size / count) < 1


def test_the_deal_depends_on_the_seed_and_nothing_else():
    assert deal(3) == deal(3, names=list(reversed(NAMES)))
    assert deal(3) != deal(3, seed=7)


def test_a_folder_is_dealt_by_its_own_names_alone():
    """A local walk and a remote listing of the same folder agree whatever else each holds."""
    cats = [name for name in NAMES if name.startswith("train/cat/")]
    assert Shard(1, 3).select(cats, 42) == {name for name in deal(3)[1] if name in cats}


def test_one_worker_keeps_everything():
    assert EVERYTHING.select(NAMES, 42) == set(NAMES)
    assert not EVERYTHING.is_partial and Shard(0, 2).is_partial


def test_a_shard_outside_its_cluster_is_refused():
    with pytest.raises(ValueError):
        Shard(2, 2)
