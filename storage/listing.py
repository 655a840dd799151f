"""Listing: a data tree's fingerprint, cheap and stable, which job/results/identity.py records with a run.

How many files the tree holds, and a digest of their names (relative to the tree), sizes and
versions: from a gs:// listing (CRC32C), or from a local walk (modification times), never reading
a file. It changes when a file is added, removed, renamed or rewritten, and not otherwise. It is
always of the whole tree, also where a worker of a cluster pulls only its shard of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from storage.gcs import DEFAULT_RETRY_DEADLINE_S
from storage.mirror import list_objects
from storage.uris import is_remote


@dataclasses.dataclass(frozen=True)
class Listing:
    files: int
    digest: str  # SHA-256, hex


def of_tree(uri: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> Listing:
    """The Listing of everything under uri; nothing there gives 0 files."""
    entries = list_objects(uri, retry_deadline=retry_deadline) \
        if is_remote(uri) else _file_entries(Path(uri))
    digest, files = hashlib.sha256(), 0
    for entry in entries:  # as JSON: a name may hold any character, a newline included
        digest.update(json.dumps(list(entry)).encode("ascii") + b"\n")
        files += 1
    return Listing(files, digest.hexdigest())


def _file_entries(root: Path) -> Iterator[tuple[str, int | None, int | None]]:
    """(relative path, size, mtime in ns) of each file under root, in sorted order, a broken
    link as (path, None, None). Links are followed; a folder reached again (a loop) is skipped."""
    walked: set[tuple[int, int]] = set()
    for folder, folders, names in os.walk(root, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in walked:
            folders.clear()
            continue
        walked.add((status.st_dev, status.st_ino))
        folders.sort()
        for name in sorted(names):
            path = Path(folder, name)
            try:
                status = path.stat()
                size, version = status.st_size, status.st_mtime_ns
            except OSError:
                size = version = None
            yield path.relative_to(root).as_posix(), size, version
