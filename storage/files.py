"""Files: local files written whole, so that a reader never sees half of one, and compared cheaply.

Every local write of storage goes through here: a copy or new bytes go to a temporary name in
the target's folder and are renamed over the target once complete (`copy_file`, `write_bytes`),
or linked to it only where there is none yet (`create_exclusively`, which raises
FileExistsError otherwise). Beside them, the listing and pruning the local mirrors need.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from storage.uris import PARTIAL_SUFFIX


def files_under(directory: Path) -> Iterator[Path]:
    return (path for path in sorted(directory.rglob("*")) if path.is_file())


def same_file(source: Path, target: Path) -> bool:
    """True when target is a file of source's size and modification time (to the second)."""
    if not target.is_file():
        return False
    a, b = source.stat(), target.stat()
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def copy_file(source: Path, target: Path) -> int:
    """Copies under a temporary name and renames, so target is never seen half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    shutil.copy2(source, partial)
    os.replace(partial, target)
    return target.stat().st_size


def create_exclusively(source: Path, target: Path) -> int:
    """Copies source to target only if target does not exist, atomically (a hard link of a
    complete temporary copy: never half-written, never over another writer's); raises
    FileExistsError when it does."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX,
                                           dir=target.parent)
    os.close(descriptor)
    try:
        shutil.copy2(source, partial)
        os.link(partial, target)
    finally:
        os.unlink(partial)
    return target.stat().st_size


def write_bytes(target: Path, data: bytes) -> None:
    """Writes data to target whole: to a temporary name of its own (a file of the usual mode,
    not mkstemp's 0600), flushed to the disk, renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def remove_unlisted(local_dir: Path, listed: set[str]) -> int:
    """Deletes files under local_dir that are not in listed (relative posix paths); counts them."""
    if not local_dir.is_dir():
        return 0
    unlisted = [path for path in files_under(local_dir)
                if path.relative_to(local_dir).as_posix() not in listed]
    for path in unlisted:
        path.unlink()
    return len(unlisted)
