"""Owned: the places the job deletes in, each proved its own first (the ownership rule).

The job may delete only what it can prove it wrote. Checkpoints go through `sync_owned`, which
records every name it writes under the prefix in the prefix's own WRITTEN.json and deletes only
recorded names; a prefix holding anything else without that record is refused (`claim_owned`).
Local mirrors of remote data are pruned only inside CACHE_DIR, which carries the job's marker
file (`claim_cache`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator

from google.api_core import exceptions as api_exceptions

from storage import files
from storage.errors import Unusable
from storage.gcs import DEFAULT_RETRY_DEADLINE_S, Remote, connect, is_current
from storage.mirror import TransferStats
from storage.uris import as_prefix, is_remote, join, name_problem, parent_folders, split

WRITTEN = "WRITTEN.json"  # an owned prefix's record of the names the job wrote there
CACHE_MARKER = "IMAGE_CLASSIFIER_JOB_CACHE"  # in CACHE_DIR: the folder is the job's to prune

logger = logging.getLogger("storage")


def claim_owned(uri: str, owner: str, *,
                retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> None:
    """Checks that uri is free for `owner` (a run id) to write into and later clear: empty, or
    holding a WRITTEN.json record of that owner. Raises Unusable otherwise, before any write."""
    with _Prefix.open(uri, retry_deadline) as prefix:
        prefix.owned_names(owner)


def sync_owned(local_dir: Path, uri: str, owner: str, *, quiet: bool = False,
               retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> TransferStats:
    """Mirrors local_dir to the owned prefix uri: uploads new and changed files, and deletes the
    names an earlier sync recorded that local_dir no longer has, never anything else. quiet: its
    summary line is DEBUG, not INFO (the checkpoint's sync after every epoch).

    The record lists a name before its upload starts, so whatever a killed sync left is still
    known to be the job's, and is cleared later."""
    start = time.monotonic()
    local_files = {path.relative_to(local_dir).as_posix(): path
                   for path in files.files_under(local_dir)}
    with _Prefix.open(uri, retry_deadline) as prefix:
        recorded = prefix.owned_names(owner)
        changed = [name for name, path in local_files.items() if not prefix.holds(name, path)]
        prefix.record(owner, recorded | set(local_files))
        size = prefix.put([(local_files[name], name) for name in changed])
        stale = recorded - set(local_files)
        prefix.delete(stale)
        prefix.record(owner, set(local_files))
    stats = TransferStats(len(changed), size, len(local_files) - len(changed), len(stale),
                          time.monotonic() - start)
    stats.log("synced", local_dir, uri, logging.DEBUG if quiet else logging.INFO)
    return stats


def pull_owned(uri: str, local_dir: Path, owner: str, *,
               retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> TransferStats:
    """Makes local_dir (a folder of the job's cache) a copy of what the owned prefix uri records;
    nothing there yet gives an empty local_dir."""
    start = time.monotonic()
    local_dir = Path(local_dir)
    with _Prefix.open(uri, retry_deadline) as prefix:
        recorded = prefix.owned_names(owner)
        targets = {name: local_dir.joinpath(*name.split("/")) for name in recorded}
        missing = [name for name in sorted(recorded) if not prefix.holds(name, targets[name])]
        size = prefix.get([(name, targets[name]) for name in missing])
    removed = files.remove_unlisted(local_dir, recorded)
    stats = TransferStats(len(missing), size, len(recorded) - len(missing), removed,
                          time.monotonic() - start)
    stats.log("pulled", uri, local_dir)
    return stats


def clear_owned(uri: str, owner: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> int:
    """Deletes what `owner` recorded writing under uri, then the record; returns how many names.
    Anything else under uri stays, and so does a local folder that is not empty then."""
    with _Prefix.open(uri, retry_deadline) as prefix:
        recorded = prefix.owned_names(owner)
        # The record last: another process clearing the same run at once (its writer as it ends,
        # and a rerun that found it complete) must never find its files without it.
        prefix.delete(recorded)
        prefix.delete({WRITTEN})
    if not is_remote(uri):
        with contextlib.suppress(OSError):
            Path(uri).rmdir()  # the folder the first sync made, if nothing else is left in it
    logger.info("cleared %s: %d files this run wrote", uri, len(recorded))
    return len(recorded)


class _Prefix:
    """An owned prefix, a local folder or a gs:// prefix, as names relative to it."""

    def __init__(self, uri: str, remote: Remote | None):
        self.uri, self.remote = uri, remote
        self.present = self._list()

    @classmethod
    @contextlib.contextmanager
    def open(cls, uri: str, retry_deadline: float) -> Iterator["_Prefix"]:
        if not is_remote(uri):
            yield cls(uri, None)
            return
        with connect(uri, retry_deadline) as remote:
            yield cls(uri, remote)

    def owned_names(self, owner: str) -> set[str]:
        """The names owner recorded here; Unusable if the prefix holds what owner did not write."""
        if WRITTEN not in self.present:
            if self.present:
                raise Unusable(f"{self.uri}: holds {len(self.present)} files this job did not "
                               f"write (e.g. {min(self.present)!r}) and no {WRITTEN}; "
                               "refusing to write or delete there")
            return set()
        try:
            record = json.loads(self._read(WRITTEN))
            recorded_owner, names = record["owner"], set(record["names"])
        except (ValueError, KeyError, TypeError):
            raise Unusable(f"{join(self.uri, WRITTEN)}: not a record this job wrote") from None
        if any(not isinstance(name, str) or name_problem(name) for name in names):
            raise Unusable(f"{join(self.uri, WRITTEN)}: lists a name that cannot be a file under "
                           "it; not a record this job wrote")
        if recorded_owner != owner:
            raise Unusable(f"{self.uri}: belongs to run {recorded_owner!r}, not {owner!r}")
        return names

    def holds(self, name: str, local: Path) -> bool:
        """True when the prefix's name has exactly local's bytes (local may not exist)."""
        if name not in self.present:
            return False
        if self.remote:
            return is_current(local, self.present[name])
        return files.same_file(self.present[name], local)

    def record(self, owner: str, names: set[str]) -> None:
        content = json.dumps({"owner": owner, "names": sorted(names)}, indent=1).encode()
        if self.remote:
            bucket_name, key = split(self.uri)
            self.remote.client.bucket(bucket_name).blob(as_prefix(key) + WRITTEN) \
                .upload_from_string(content, retry=self.remote.retry)
        else:
            files.write_bytes(Path(self.uri, WRITTEN), content)

    def put(self, files_and_names: list[tuple[Path, str]]) -> int:
        if not self.remote:
            return sum(files.copy_file(path, Path(self.uri, name))
                       for path, name in files_and_names)
        bucket_name, key = split(self.uri)
        bucket = self.remote.client.bucket(bucket_name)
        generations = {blob.name: blob.generation for blob in self.present.values()}
        return self.remote.upload([(path, bucket.blob(as_prefix(key) + name))
                                   for path, name in files_and_names], generations)

    def get(self, names_and_targets: list[tuple[str, Path]]) -> int:
        if not self.remote:
            return sum(files.copy_file(self.present[name], target)
                       for name, target in names_and_targets)
        self.remote.download([(self.present[name], target) for name, target in names_and_targets])
        return sum(self.present[name].size or 0 for name, _ in names_and_targets)

    def delete(self, names: set[str]) -> None:
        """Deletes those of names that are present; locally, also the folders that held them and
        are empty now (rmdir refuses any that are not)."""
        present = sorted(names & set(self.present))
        for name in present:
            if self.remote:
                with contextlib.suppress(api_exceptions.NotFound):
                    self.present[name].delete(retry=self.remote.retry)
            else:
                self.present[name].unlink(missing_ok=True)
        if not self.remote:
            folders = {Path(self.uri, folder) for name in present
                       for folder in parent_folders(name)}
            for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _list(self) -> dict:
        if not self.remote:
            root = Path(self.uri)
            if root.exists() and not root.is_dir():
                raise Unusable(f"{self.uri}: is a file, expected a folder")
            return {path.relative_to(root).as_posix(): path for path in files.files_under(root)} \
                if root.is_dir() else {}
        bucket_name, key = split(self.uri)
        prefix = as_prefix(key)
        return {blob.name[len(prefix):]: blob for blob in self.remote.client.list_blobs(
            bucket_name, prefix=prefix, retry=self.remote.retry)}

    def _read(self, name: str) -> bytes:
        if self.remote:
            return self.present[name].download_as_bytes(retry=self.remote.retry)
        return self.present[name].read_bytes()

# --- The cache: a folder the job marks as its own before it writes or prunes anything there. ---

def claim_cache(cache_dir: Path) -> None:
    """Makes cache_dir the job's (creating it with its marker), or checks that it already is.
    Raises Unusable for a folder that holds files but no marker: the job prunes its mirrors there."""
    cache_dir = Path(cache_dir)
    marker = cache_dir / CACHE_MARKER
    if marker.is_file():
        return
    if cache_dir.exists() and not cache_dir.is_dir():
        raise Unusable(f"{cache_dir}: is a file, expected a folder")
    if cache_dir.is_dir() and any(cache_dir.iterdir()):
        raise Unusable(f"{cache_dir}: holds files this job did not write (no {CACHE_MARKER}); "
                       "set CACHE_DIR to an empty or new folder")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text("The cache of image-classifier-job: it deletes and rewrites files here.\n")
    except OSError as error:
        raise Unusable(f"{cache_dir}: cannot be written ({error.strerror or error})") from None

