"""Mirror: whole trees moved between a URI and a local folder, and the checks of a URI before that.

The rest of the job works on local directories only: `pull_tree` (and `fetch_tree`,
`fetch_file`) turn a URI into a local folder, pulling remote data into the cache; `publish_tree`
copies a finished local folder to its URI. Transfers run in bounded batches fed from the listing
as it pages, so a prefix of any size never sits in memory as a whole. Each transfer returns
TransferStats, which is also logged on the "storage" logger.

What another writer wrote is never overwritten: `publish_tree` uploads each object on condition
that its generation is still the one listed before the upload began (absent: none), and its
completion marker only if there is none yet (locally: created exclusively), raising Conflict
otherwise.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from google.api_core import exceptions as api_exceptions
from google.cloud import storage as gcs

from storage import diskspace, files
from storage.errors import Conflict, StorageError, Unusable
from storage.gcs import (
    DEFAULT_MAX_WORKERS,
    DEFAULT_RETRY_DEADLINE_S,
    Remote,
    connect,
    is_current,
)
from storage.uris import (
    as_prefix,
    is_remote,
    local_dir_for,
    name_problem,
    parent_folders,
    split,
)

DEFAULT_BATCH_SIZE = 1000

logger = logging.getLogger("storage")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """What one pull or push moved: `objects`/`bytes` transferred, `cached` already up to date
    (not transferred), `removed` deleted from the destination to mirror the source, `skipped`
    the objects that could not be stored, each with its reason."""

    objects: int = 0
    bytes: int = 0
    cached: int = 0
    removed: int = 0
    seconds: float = 0.0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # object name -> reason

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        """The stats as plain numbers for metrics.json."""
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3),
                "mb_per_s": round(self.mb_per_s, 3), "skipped": len(self.skipped)}

    def log(self, verb: str, source: object, destination: object,
            level: int = logging.INFO) -> None:
        logger.log(level, "%s %s -> %s: %d objects, %.2f MB in %.2f s (%.2f MB/s); %d already "
                   "current, %d removed", verb, source, destination, self.objects,
                   self.bytes / 1e6, self.seconds, self.mb_per_s, self.cached, self.removed)


def exists(uri: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> bool:
    """True when the file, object, directory or prefix exists.

    A missing bucket raises StorageError rather than answering False, so that a misspelt
    OUTPUT_URI fails before training instead of after it.
    """
    if not is_remote(uri):
        return Path(uri).exists()
    bucket_name, key = split(uri)
    with connect(uri, retry_deadline) as remote:
        bucket = remote.client.bucket(bucket_name)
        if not key:
            return bucket.exists(retry=remote.retry)
        if bucket.blob(key).exists(retry=remote.retry):
            return True
        listing = remote.client.list_blobs(bucket_name, prefix=as_prefix(key), max_results=1,
                                           retry=remote.retry)
        return next(iter(listing), None) is not None


def check_writable(uri: str) -> None:
    """Creates a local folder uri (and its parents) if need be; Unusable when that cannot be done
    or uri is a file. A gs:// URI is checked by its first request instead."""
    if is_remote(uri):
        return
    path = Path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise Unusable(f"{uri}: is a file, expected a folder") from None
    except OSError as error:
        raise Unusable(f"{uri}: cannot be created ({error.strerror or error})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise Unusable(f"{uri}: is not writable")


def list_objects(uri: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S
                 ) -> Iterator[tuple[str, int, str]]:
    """(name relative to uri, size, version) of each object under uri, in name order, console
    "folder" placeholders left out; the version is its CRC32C (its generation where it has
    none). Only the fields needed are asked for: one short request per 1,000 objects."""
    bucket_name, key = split(uri)
    prefix = as_prefix(key)
    with connect(uri, retry_deadline) as remote:
        for blob in remote.client.list_blobs(bucket_name, prefix=prefix, retry=remote.retry,
                                             fields="items(name,size,crc32c,generation),"
                                                    "nextPageToken"):
            if not (blob.name.endswith("/") and not blob.size):
                yield blob.name[len(prefix):], blob.size, blob.crc32c or str(blob.generation)


def fetch_tree(uri: str, cache_dir: Path, **options) -> Path:
    """Returns a local directory holding everything under uri (pulled into cache_dir if remote).

    For the transfer statistics call pull_tree(uri, local_dir_for(uri, cache_dir)) instead.
    """
    local_dir = local_dir_for(uri, cache_dir)
    pull_tree(uri, local_dir, **options)
    return local_dir


def fetch_file(uri: str, cache_dir: Path, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> Path:
    """Returns a local path holding the file at uri (downloaded into cache_dir if remote)."""
    if not is_remote(uri):
        path = Path(uri)
        if not path.is_file():
            raise Unusable(f"{uri}: no such file")
        return path
    bucket_name, key = split(uri)
    target = local_dir_for(uri, cache_dir)
    with connect(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry) if key else None
        if blob is None:
            raise Unusable(f"{uri}: {remote.not_found_cause(bucket_name)}")
        if not is_current(target, blob):
            remote.download([(blob, target)])
    return target


def pull_tree(uri: str, local_dir: Path, *, allow_empty: bool = False,
              select: Callable[[list[str]], set[str]] | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE, max_workers: int = DEFAULT_MAX_WORKERS,
              retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> TransferStats:
    """Makes local_dir a mirror of everything under uri and says what that moved.

    Files already there with the size and checksum of their object are kept (a re-run pulls only
    what is missing or changed); files under local_dir that are not under uri are deleted. Each
    download goes to a temporary name and is renamed as soon as it is complete and verified.
    Objects whose names cannot be local files are skipped, each with its reason in
    `TransferStats.skipped`. An empty or absent prefix, or one with no storable name, raises
    Unusable unless allow_empty.

    With select (given every storable name, relative to uri, it returns the ones to pull: one
    worker's shard, job/inputs/shard.py) only those are mirrored, though every folder is made, so each
    worker sees every class folder. The whole listing is then read before the first download (a
    shard is dealt from whole folders), and held in memory meanwhile.
    """
    local_dir = Path(local_dir)
    if not is_remote(uri):
        return _mirror_local(Path(uri), local_dir, allow_empty=allow_empty)
    start = time.monotonic()
    bucket_name, key = split(uri)
    prefix = as_prefix(key)
    names = _NameCheck()
    logger.info("pulling %s -> %s", uri, local_dir)
    with connect(uri, retry_deadline, max_workers) as remote:
        listing = remote.client.list_blobs(bucket_name, prefix=prefix, retry=remote.retry)
        accepted = ((blob.name[len(prefix):], blob) for blob in listing
                    # skipping zero-byte "folder" placeholders made by the console
                    if not (blob.name.endswith("/") and not blob.size)
                    and names.accept(blob.name[len(prefix):]))
        if select is not None:
            accepted = _selected(list(accepted), select, local_dir)
            kept = {relative for relative, _ in accepted}
        objects, size, cached = _download_missing(remote, accepted, batch_size, local_dir, uri)
    if not names.files and not allow_empty:  # retrying cannot help: exit 2, not 1
        raise names.nothing_usable(uri)
    removed = files.remove_unlisted(local_dir, names.files if select is None else kept)
    stats = TransferStats(objects, size, cached, removed, time.monotonic() - start,
                          skipped=names.skipped)
    stats.log("pulled", uri, local_dir)
    return stats


def _download_missing(remote: Remote, accepted: Iterable[tuple[str, gcs.Blob]], batch_size: int,
                      local_dir: Path, uri: str) -> tuple[int, int, int]:
    """Downloads, batch by batch, the objects not already current under local_dir, each batch
    after checking the disk has room for it; (objects, bytes) downloaded and how many were
    current."""
    objects = size = cached = 0
    for batch in _batches(accepted, batch_size):
        missing = []
        for relative, blob in batch:
            target = local_dir.joinpath(*relative.split("/"))
            if is_current(target, blob):
                cached += 1
            else:
                missing.append((blob, target))
        diskspace.require(local_dir, sum(blob.size or 0 for blob, _ in missing),
                          f"the next {len(missing)} objects of {uri}")
        remote.download(missing)
        objects += len(missing)
        size += sum(blob.size or 0 for blob, _ in missing)
    return objects, size, cached


def _selected(accepted: list[tuple[str, gcs.Blob]], select: Callable[[list[str]], set[str]],
              local_dir: Path) -> list[tuple[str, gcs.Blob]]:
    """The (name, object) pairs select keeps; makes every folder of the listing under local_dir."""
    chosen = select([relative for relative, _ in accepted])
    for folder in {relative.rpartition("/")[0] for relative, _ in accepted} - {""}:
        local_dir.joinpath(*folder.split("/")).mkdir(parents=True, exist_ok=True)
    return [(relative, blob) for relative, blob in accepted if relative in chosen]


class _NameCheck:
    """The object names of one listing, checked as they come: each must be storable as a local
    file (name_problem) and must not need a path that an earlier name already took as a file, or
    as a folder. The ones that cannot be stored are kept in `skipped` with their reasons."""

    def __init__(self):
        self.files: set[str] = set()
        self.folders: set[str] = set()
        self.skipped: dict[str, str] = {}

    def accept(self, relative: str) -> bool:
        problem = name_problem(relative)
        parents = parent_folders(relative)
        if problem is None and relative in self.folders:
            problem = f"is also a folder of other objects ({relative}/...)"
        if problem is None:
            clash = next((parent for parent in parents if parent in self.files), None)
            if clash:
                problem = f"needs {clash!r} as a folder, but it is an object"
        if problem:
            problem = f"object name {problem}"
            self.skipped[relative] = problem
            logger.warning("skipped %r: %s", relative, problem)
            return False
        self.files.add(relative)
        self.folders.update(parents)
        return True

    def nothing_usable(self, uri: str) -> Unusable:
        """The error of a listing that had no storable name, naming one that was skipped."""
        if not self.skipped:
            return Unusable(f"{uri}: no usable objects under this prefix")
        name, reason = next(iter(self.skipped.items()))
        return Unusable(f"{uri}: no usable objects under this prefix ({len(self.skipped)} "
                        f"skipped: e.g. {name!r}: {reason})")


def publish_tree(local_dir: Path, uri: str, last: str | None = None, *,
                 max_workers: int = DEFAULT_MAX_WORKERS,
                 retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> TransferStats:
    """Copies local_dir to uri, the file named `last` (the completion marker) after every other one
    has been written, so a reader never takes a half-written run for a complete one.

    Nothing another writer wrote is overwritten, whatever the timing: on gs:// the prefix is
    listed first, and each object is uploaded only if its generation is still the listed one (or
    there is still none), the marker only if there is none; locally the marker is created
    exclusively. Raises Conflict when uri already holds `last` (a completed run is never
    overwritten) or another writer got there first.
    """
    local_dir = Path(local_dir)
    marker = local_dir / last if last else None
    if marker is not None and not marker.is_file():
        raise StorageError(f"{marker}: completion marker missing, nothing published to {uri}")
    if not is_remote(uri) and Path(uri).resolve() == local_dir.resolve():
        return TransferStats()
    start = time.monotonic()
    paths = (path for path in files.files_under(local_dir) if path != marker)
    if is_remote(uri):
        objects, size = _upload_tree(local_dir, paths, last, uri, max_workers, retry_deadline)
    else:
        objects, size = _copy_tree(local_dir, paths, last, uri)
    stats = TransferStats(objects, size, seconds=time.monotonic() - start)
    stats.log("published", local_dir, uri)
    return stats


def _copy_tree(local_dir: Path, paths: Iterable[Path], last: str | None,
               uri: str) -> tuple[int, int]:
    """publish_tree to a local folder; (files, bytes) copied."""
    if last and Path(uri, last).exists():
        raise _completed(uri, last)
    copied = [files.copy_file(path, Path(uri, path.relative_to(local_dir))) for path in paths]
    if last:
        try:
            copied.append(files.create_exclusively(local_dir / last, Path(uri, last)))
        except FileExistsError:
            raise _completed(uri, last) from None
    return len(copied), sum(copied)


def _upload_tree(local_dir: Path, paths: Iterable[Path], last: str | None, uri: str,
                 max_workers: int, retry_deadline: float) -> tuple[int, int]:
    """publish_tree to a gs:// prefix; (objects, bytes) uploaded."""
    bucket_name, key = split(uri)
    marker = local_dir / last if last else None
    objects = size = 0
    with connect(uri, retry_deadline, max_workers) as remote:
        bucket = remote.client.bucket(bucket_name)
        listed = {blob.name: blob.generation for blob in remote.client.list_blobs(
            bucket_name, prefix=as_prefix(key), retry=remote.retry)}
        if marker is not None and _object_name(key, marker, local_dir) in listed:
            raise _completed(uri, last)
        try:
            for batch in [*_batches(paths, DEFAULT_BATCH_SIZE), *([[marker]] if marker else [])]:
                size += remote.upload([(path, bucket.blob(_object_name(key, path, local_dir)))
                                       for path in batch], listed)
                objects += len(batch)
        except api_exceptions.PreconditionFailed:
            raise Conflict(f"{uri}: another writer wrote {'this run' if last else 'here'} "
                           f"since this one listed it; refusing to overwrite it") from None
    return objects, size


def _completed(uri: str, last: str) -> Conflict:
    return Conflict(f"{uri}: already holds a completed run ({last}); refusing to overwrite it")


def _object_name(key: str, path: Path, local_dir: Path) -> str:
    return as_prefix(key) + path.relative_to(local_dir).as_posix()


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _mirror_local(source: Path, target: Path, allow_empty: bool) -> TransferStats:
    """Local counterpart of pull_tree: target becomes a copy of source."""
    if not source.is_dir():
        if allow_empty and not source.exists():
            return TransferStats(removed=files.remove_unlisted(target, set()))
        raise StorageError(f"{source}: no such directory" if not source.exists()
                           else f"{source}: is a file, expected a directory")
    start = time.monotonic()
    relatives = {path.relative_to(source).as_posix() for path in files.files_under(source)}
    if source.resolve() == target.resolve():
        return TransferStats(cached=len(relatives))
    changed = [relative for relative in sorted(relatives)
               if not files.same_file(source / relative, target / relative)]
    size = sum(files.copy_file(source / relative, target / relative) for relative in changed)
    removed = files.remove_unlisted(target, relatives)
    return TransferStats(len(changed), size, len(relatives) - len(changed), removed,
                         time.monotonic() - start)
