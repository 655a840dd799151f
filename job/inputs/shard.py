"""Shard: which of the data set's files one worker of a cluster pulls, decodes and runs through
the frozen layers, so that N workers each do 1/N of that work.

Pure and decided from file names alone, so every worker (and the export, which finds a run's
splits again) computes every worker's share without talking to the others, before anything is
pulled. The files of each folder (a class folder, or a folder nested in one) are dealt out like
cards: put in a seeded pseudo-random order, then given to the workers in turn, starting at a
seeded worker. Every worker so gets its fair share of every class and split, within one file per
folder, and no file goes to two workers or to none. The deal of one folder depends only on the
names in that folder, so a remote listing and a local walk of the same files agree.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from typing import Iterable


@dataclasses.dataclass(frozen=True)
class Shard:
    """Worker `index` of `count` (0 <= index < count)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist")

    @property
    def is_partial(self) -> bool:
        """True when this worker sees only part of the data."""
        return self.count > 1

    def select(self, names: Iterable[str], seed: int) -> set[str]:
        """The names (relative posix paths) dealt to this worker."""
        names = set(names)
        if not self.is_partial:
            return names
        folders: dict[str, list[str]] = defaultdict(list)
        for name in names:
            folders[name.rpartition("/")[0]].append(name)
        chosen = set()
        for folder, members in folders.items():
            members.sort(key=lambda name: (_hash(seed, name), name))
            first = _hash(seed, folder + "/") % self.count  # so no worker always gets the extra file
            chosen.update(members[(self.index - first) % self.count::self.count])
        return chosen

    def describe(self) -> str:
        return f"worker {self.index + 1} of {self.count}"


EVERYTHING = Shard()


def _hash(seed: int, text: str) -> int:
    return zlib.crc32(f"{seed}:{text}".encode())
