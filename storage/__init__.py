"""Storage: every URI the job reads or writes, local paths and gs://bucket/prefix alike.

The rest of the job works on local directories only; this module turns URIs into local paths
(pulling remote data into a cache) and publishes finished local directories back to their URI.

Remote URIs go through google-cloud-storage with Application Default Credentials (Workload
Identity on GKE, the attached service account on Vertex AI). When STORAGE_EMULATOR_HOST is set
the client library itself talks to that endpoint with anonymous credentials. Transient failures
(429, 5xx, timeouts, connection resets) are retried with backoff for up to `retry_deadline`
seconds; anything that still fails raises StorageError with one line naming the URI and the cause.

Transfers of many objects run in parallel on threads (the job has TensorFlow loaded, which must
not be forked), in bounded batches fed from the listing as it pages, so a prefix of any size never
sits in memory as a whole. A call gives up when `retry_deadline` seconds pass with no transfer
succeeding, and a signal (SIGTERM) stops it at once, keeping every file already finished. Each
transfer returns TransferStats, which is also logged on the "storage" logger.

What the job may delete (the ownership rule): only what it can prove it wrote. Checkpoints go
through `sync_owned`, which records every name it writes under the prefix in the prefix's own
WRITTEN.json and deletes only recorded names; a prefix holding anything else without that record
is refused (`claim_owned`). Local mirrors of remote data are pruned only inside CACHE_DIR, which
carries the job's marker file (`claim_cache`).

What another writer wrote is never overwritten: `publish_tree` uploads each object on condition
that its generation is still the one listed before the upload began (absent: none), and its
completion marker only if there is none yet (locally: created exclusively), raising Conflict
otherwise. The single-object calls (`read_object`, `write_object_if`, `delete_object_if`) are the
conditional writes job/results/writer.py builds a run's claim from.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from common.progress import Progress
from storage import diskspace

GCS_SCHEME = "gs://"
DEFAULT_RETRY_DEADLINE_S = 120.0
DEFAULT_MAX_WORKERS = 8
DEFAULT_BATCH_SIZE = 1000
PARTIAL_SUFFIX = ".partial"
MAX_NAME_BYTES = 255  # the longest file name ext4, XFS and overlayfs store
BUCKET_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,220}[a-z0-9])?$")  # GCS asks 3+ too
CHECKSUM_CHUNK_BYTES = 1 << 20
WRITTEN = "WRITTEN.json"  # an owned prefix's record of the names the job wrote there
CACHE_MARKER = "IMAGE_CLASSIFIER_JOB_CACHE"  # in CACHE_DIR: the folder is the job's to prune
REQUEST_TIMEOUT_S = (10, 60)  # connect, read: a silent endpoint fails a request, not the job

logger = logging.getLogger("storage")
T = TypeVar("T")


class StorageError(Exception):
    """A URI could not be read or written; the message names the URI and the cause."""


class Unusable(StorageError):
    """A URI that cannot be used as it is set: missing, of the wrong kind, not writable, or
    holding what the job did not write. Retrying cannot help."""


class Conflict(Unusable):
    """Another writer changed what this one was about to write (a complete run, an object since
    it was listed): nothing of its is overwritten. Retrying cannot help."""


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


def is_remote(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


# --- URIs and object names: every one is normalised and checked here, once. ---

def normalise_uri(uri: str) -> str:
    """The canonical form of a setting's URI: gs://bucket/key without a trailing slash, or an
    absolute local path. Raises ValueError saying what is wrong.

    A gs:// key is used as it is to name objects and local mirror folders, so '.', '..' and empty
    components (which GCS allows in object names) are refused rather than interpreted: joined onto
    a local cache folder they would point outside it. Local paths mean what the shell means.
    """
    uri = str(uri)
    if "\0" in uri:
        raise ValueError("contains a NUL character")
    if not is_remote(uri):
        return os.path.abspath(uri)
    bucket_name, _, key = uri[len(GCS_SCHEME):].partition("/")
    if not BUCKET_NAME.match(bucket_name):
        raise ValueError("expected gs://bucket/prefix with a valid bucket name")
    key = key[:-1] if key.endswith("/") else key
    problem = key and name_problem(key)
    if problem:
        raise ValueError(problem)
    return join(GCS_SCHEME + bucket_name, key) if key else GCS_SCHEME + bucket_name


def name_problem(relative: str) -> str | None:
    """Why an object name (relative to the prefix being pulled) cannot be a local file, or None."""
    parts = relative.split("/")
    if "\0" in relative:
        return "contains a NUL character"
    if "" in parts:
        return "has an empty component (a leading, trailing or doubled '/')"
    if "." in parts or ".." in parts:
        return "has a '.' or '..' component"
    if any(len(part.encode()) > MAX_NAME_BYTES for part in parts):
        return f"has a component longer than {MAX_NAME_BYTES} bytes"
    if relative.endswith(PARTIAL_SUFFIX):
        return f"ends in {PARTIAL_SUFFIX}, the suffix of unfinished downloads"
    return None


def overlaps(first: str, second: str) -> bool:
    """True when one normalised URI is the other or lies under it (local paths by real path)."""
    if is_remote(first) != is_remote(second):
        return False
    if not is_remote(first):
        first, second = os.path.realpath(first), os.path.realpath(second)
    a, b = first.rstrip("/") + "/", second.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a local path or a gs:// URI."""
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def exists(uri: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> bool:
    """True when the file, object, directory or prefix exists.

    A missing bucket raises StorageError rather than answering False, so that a misspelt
    OUTPUT_URI fails before training instead of after it.
    """
    if not is_remote(uri):
        return Path(uri).exists()
    bucket_name, key = _split(uri)
    with _remote(uri, retry_deadline) as remote:
        bucket = remote.client.bucket(bucket_name)
        if not key:
            return bucket.exists(retry=remote.retry)
        if bucket.blob(key).exists(retry=remote.retry):
            return True
        listing = remote.client.list_blobs(bucket_name, prefix=_as_prefix(key), max_results=1,
                                           retry=remote.retry)
        return next(iter(listing), None) is not None


def list_objects(uri: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S
                 ) -> Iterator[tuple[str, int, str]]:
    """(name relative to uri, size, version) of each object under uri, in name order, console
    "folder" placeholders left out; the version is its CRC32C (its generation where it has
    none). Only the fields needed are asked for: one short request per 1,000 objects."""
    bucket_name, key = _split(uri)
    prefix = _as_prefix(key)
    with _remote(uri, retry_deadline) as remote:
        for blob in remote.client.list_blobs(bucket_name, prefix=prefix, retry=remote.retry,
                                             fields="items(name,size,crc32c,generation),"
                                                    "nextPageToken"):
            if not (blob.name.endswith("/") and not blob.size):
                yield blob.name[len(prefix):], blob.size, blob.crc32c or str(blob.generation)


def local_dir_for(uri: str, cache_dir: Path) -> Path:
    """The local path that mirrors uri: uri itself when local, cache_dir/bucket/key when remote."""
    if not is_remote(uri):
        return Path(uri)
    bucket_name, key = _split(uri)
    return Path(cache_dir, bucket_name, *key.split("/"))


def fetch_tree(uri: str, cache_dir: Path, **options) -> Path:
    """Returns a local directory holding everything under uri (pulled into cache_dir if remote).

    For the transfer statistics call pull_tree(uri, local_dir_for(uri, cache_dir)) instead.
    """
    local_dir = local_dir_for(uri, cache_dir)
    pull_tree(uri, local_dir, **options)
    return local_dir


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
    bucket_name, key = _split(uri)
    prefix = _as_prefix(key)
    names = _NameCheck()
    objects = size = cached = 0
    logger.info("pulling %s -> %s", uri, local_dir)
    with _remote(uri, retry_deadline, max_workers) as remote:
        listing = remote.client.list_blobs(bucket_name, prefix=prefix, retry=remote.retry)
        accepted = ((blob.name[len(prefix):], blob) for blob in listing
                    # skipping zero-byte "folder" placeholders made by the console
                    if not (blob.name.endswith("/") and not blob.size)
                    and names.accept(blob.name[len(prefix):]))
        if select is not None:
            accepted = _selected(list(accepted), select, local_dir)
            kept = {relative for relative, _ in accepted}
        for batch in _batches(accepted, batch_size):
            missing = []
            for relative, blob in batch:
                target = local_dir.joinpath(*relative.split("/"))
                if _is_current(target, blob):
                    cached += 1
                else:
                    missing.append((blob, target))
            diskspace.require(local_dir, sum(blob.size or 0 for blob, _ in missing),
                              f"the next {len(missing)} objects of {uri}")
            remote.download(missing)
            objects += len(missing)
            size += sum(blob.size or 0 for blob, _ in missing)
    if not names.files and not allow_empty:  # retrying cannot help: exit 2, not 1
        raise Unusable(f"{uri}: no usable objects under this prefix"
                       + (f" ({len(names.skipped)} skipped: {_first(names.skipped)})"
                          if names.skipped else ""))
    removed = _remove_unlisted(local_dir, names.files if select is None else kept)
    stats = TransferStats(objects, size, cached, removed, time.monotonic() - start,
                          skipped=names.skipped)
    _log("pulled", uri, local_dir, stats)
    return stats


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
        parents = _parent_folders(relative)
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


def _parent_folders(name: str) -> list[str]:
    """The folders a relative name lies in, outermost first: "a/b/c.jpeg" -> ["a", "a/b"]."""
    parts = name.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def _first(skipped: dict[str, str]) -> str:
    name, reason = next(iter(skipped.items()))
    return f"e.g. {name!r}: {reason}"


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


def fetch_file(uri: str, cache_dir: Path, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> Path:
    """Returns a local path holding the file at uri (downloaded into cache_dir if remote)."""
    if not is_remote(uri):
        path = Path(uri)
        if not path.is_file():
            raise Unusable(f"{uri}: no such file")
        return path
    bucket_name, key = _split(uri)
    target = local_dir_for(uri, cache_dir)
    with _remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry) if key else None
        if blob is None:
            raise Unusable(f"{uri}: {remote.not_found_cause(bucket_name)}")
        if not _is_current(target, blob):
            remote.download([(blob, target)])
    return target


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
    files = (path for path in _files_under(local_dir) if path != marker)
    if not is_remote(uri):
        if last and Path(uri, last).exists():
            raise _completed(uri, last)
        copied = [_copy_file(path, Path(uri, path.relative_to(local_dir))) for path in files]
        if marker is not None:
            copied.append(_create_exclusively(marker, Path(uri, last), uri))
        stats = TransferStats(len(copied), sum(copied), seconds=time.monotonic() - start)
        _log("published", local_dir, uri, stats)
        return stats
    bucket_name, key = _split(uri)
    objects = size = 0
    with _remote(uri, retry_deadline, max_workers) as remote:
        bucket = remote.client.bucket(bucket_name)
        listed = {blob.name: blob.generation for blob in remote.client.list_blobs(
            bucket_name, prefix=_as_prefix(key), retry=remote.retry)}
        if marker is not None and _object_name(key, marker, local_dir) in listed:
            raise _completed(uri, last)
        try:
            for batch in [*_batches(files, DEFAULT_BATCH_SIZE), *([[marker]] if marker else [])]:
                size += remote.upload(_blobs(bucket, key, batch, local_dir), listed)
                objects += len(batch)
        except api_exceptions.PreconditionFailed:
            raise Conflict(f"{uri}: another writer wrote {'this run' if last else 'here'} "
                           f"since this one listed it; refusing to overwrite it") from None
    stats = TransferStats(objects, size, seconds=time.monotonic() - start)
    _log("published", local_dir, uri, stats)
    return stats


def _blobs(bucket: gcs.Bucket, key: str, paths: list[Path],
           local_dir: Path) -> list[tuple[Path, gcs.Blob]]:
    return [(path, bucket.blob(_object_name(key, path, local_dir))) for path in paths]


def _completed(uri: str, last: str) -> Conflict:
    return Conflict(f"{uri}: already holds a completed run ({last}); refusing to overwrite it")


def _create_exclusively(source: Path, target: Path, uri: str) -> int:
    """Copies source to target only if target does not exist, atomically (a hard link of a
    complete temporary copy: never half-written, never over another writer's)."""
    descriptor, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX,
                                           dir=target.parent)
    os.close(descriptor)
    try:
        shutil.copy2(source, partial)
        os.link(partial, target)
    except FileExistsError:
        raise _completed(uri, target.name) from None
    finally:
        os.unlink(partial)
    return target.stat().st_size


# --- Single objects written on condition (a run's claim, job/results/writer.py) ---

def read_object(uri: str, *,
                retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> tuple[bytes, int] | None:
    """The bytes and generation of the live object at a gs:// uri; None when there is none."""
    bucket_name, key = _split(uri)
    with _remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry)
        if blob is None:
            return None
        generation = blob.generation
        try:  # the download names the generation read: replaced since, it is not found
            return blob.download_as_bytes(retry=remote.retry), generation
        except api_exceptions.NotFound:
            return None


def write_object_if(uri: str, content: bytes, generation: int, *,
                    retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> int | None:
    """Writes content to the gs:// uri only if the live generation there is `generation` (0:
    there is no object); returns the new generation, or None when that did not hold."""
    bucket_name, key = _split(uri)
    with _remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).blob(key)
        try:
            blob.upload_from_string(content, if_generation_match=generation, retry=remote.retry,
                                    timeout=REQUEST_TIMEOUT_S)
        except api_exceptions.PreconditionFailed:
            return None
        return blob.generation


def delete_object_if(uri: str, generation: int, *,
                     retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> bool:
    """Deletes the gs:// object at uri only if its live generation is `generation`; says whether
    it did."""
    bucket_name, key = _split(uri)
    with _remote(uri, retry_deadline) as remote:
        try:
            remote.client.bucket(bucket_name).blob(key).delete(
                if_generation_match=generation, retry=remote.retry, timeout=REQUEST_TIMEOUT_S)
        except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
            return False
        return True


# --- Owned prefixes (checkpoints): the job deletes only names it recorded writing there. ---

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
    local_files = {path.relative_to(local_dir).as_posix(): path for path in _files_under(local_dir)}
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
    _log("synced", local_dir, uri, stats, logging.DEBUG if quiet else logging.INFO)
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
    removed = _remove_unlisted(local_dir, recorded)
    stats = TransferStats(len(missing), size, len(recorded) - len(missing), removed,
                          time.monotonic() - start)
    _log("pulled", uri, local_dir, stats)
    return stats


def clear_owned(uri: str, owner: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> int:
    """Deletes what `owner` recorded writing under uri, then the record; returns how many names.
    Anything else under uri stays, and so does a local folder that is not empty then."""
    with _Prefix.open(uri, retry_deadline) as prefix:
        recorded = prefix.owned_names(owner)
        prefix.delete(recorded | {WRITTEN})
    if not is_remote(uri):
        with contextlib.suppress(OSError):
            Path(uri).rmdir()  # the folder the first sync made, if nothing else is left in it
    logger.info("cleared %s: %d files this run wrote", uri, len(recorded))
    return len(recorded)


class _Prefix:
    """An owned prefix, a local folder or a gs:// prefix, as names relative to it."""

    def __init__(self, uri: str, remote: _Remote | None):
        self.uri, self.remote = uri, remote
        self.present = self._list()

    @classmethod
    @contextlib.contextmanager
    def open(cls, uri: str, retry_deadline: float) -> Iterator["_Prefix"]:
        if not is_remote(uri):
            yield cls(uri, None)
            return
        with _remote(uri, retry_deadline) as remote:
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
            return _is_current(local, self.present[name])
        return _same_file(self.present[name], local)

    def record(self, owner: str, names: set[str]) -> None:
        content = json.dumps({"owner": owner, "names": sorted(names)}, indent=1).encode()
        if self.remote:
            bucket_name, key = _split(self.uri)
            self.remote.client.bucket(bucket_name).blob(_as_prefix(key) + WRITTEN) \
                .upload_from_string(content, retry=self.remote.retry)
        else:
            target = Path(self.uri, WRITTEN)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(WRITTEN + PARTIAL_SUFFIX)
            partial.write_bytes(content)
            os.replace(partial, target)

    def put(self, files_and_names: list[tuple[Path, str]]) -> int:
        if not self.remote:
            return sum(_copy_file(path, Path(self.uri, name)) for path, name in files_and_names)
        bucket_name, key = _split(self.uri)
        bucket = self.remote.client.bucket(bucket_name)
        generations = {blob.name: blob.generation for blob in self.present.values()}
        return self.remote.upload([(path, bucket.blob(_as_prefix(key) + name))
                                   for path, name in files_and_names], generations)

    def get(self, names_and_targets: list[tuple[str, Path]]) -> int:
        if not self.remote:
            return sum(_copy_file(self.present[name], target) for name, target in names_and_targets)
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
                       for folder in _parent_folders(name)}
            for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _list(self) -> dict:
        if not self.remote:
            root = Path(self.uri)
            if root.exists() and not root.is_dir():
                raise Unusable(f"{self.uri}: is a file, expected a folder")
            return {path.relative_to(root).as_posix(): path for path in _files_under(root)} \
                if root.is_dir() else {}
        bucket_name, key = _split(self.uri)
        prefix = _as_prefix(key)
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


@dataclasses.dataclass(frozen=True)
class _Remote:
    """One client with the retry policy and parallelism every request of one call uses."""

    client: gcs.Client
    retry: api_retry.Retry
    max_workers: int
    deadline: float  # seconds without any transfer finishing before the call gives up

    def download(self, blobs_and_targets: list[tuple[gcs.Blob, Path]]) -> None:
        """Downloads in parallel, each to a temporary name renamed into place as soon as it is
        complete, so a failure or a SIGTERM keeps every download that had finished."""
        def download(blob: gcs.Blob, target: Path) -> None:
            partial = target.with_name(target.name + PARTIAL_SUFFIX)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                blob.download_to_filename(str(partial), retry=self.retry, timeout=REQUEST_TIMEOUT_S)
                os.replace(partial, target)
            except OSError as error:  # the local disk, not the URI, is at fault: DiskFull (exit 2)
                if diskspace.from_error(error) is None:
                    raise
                partial.unlink(missing_ok=True)
                raise diskspace.DiskFull(target, diskspace.free_bytes(target), blob.size,
                                         "the download") from None
            finally:
                partial.unlink(missing_ok=True)

        self._parallel("downloading", [functools.partial(download, blob, target)
                                       for blob, target in blobs_and_targets])

    def upload(self, files_and_blobs: list[tuple[Path, gcs.Blob]],
               generations: dict[str, int]) -> int:
        """Uploads in parallel, each object only if its live generation is the one in generations
        (absent: only if there is none), and returns the bytes sent; the first failure raises
        (PreconditionFailed where another writer got there first)."""
        self._parallel("uploading", [
            functools.partial(blob.upload_from_filename, str(path), retry=self.retry,
                              timeout=REQUEST_TIMEOUT_S,
                              if_generation_match=generations.get(blob.name, 0))
            for path, blob in files_and_blobs])
        return sum(path.stat().st_size for path, _ in files_and_blobs)

    def _parallel(self, step: str, transfers: list[Callable[[], object]]) -> None:
        """Runs the transfers on max_workers daemon threads, logging their progress as step, then
        raises the first failure; raises StorageError at once when `deadline` seconds pass with no
        transfer succeeding.

        Written here rather than taken from transfer_manager, whose thread pool is joined before it
        returns: with it a SIGTERM waits for the whole batch, a dead endpoint for every transfer's
        own retry deadline in turn, and the main thread cannot give up. Daemon threads can be left
        behind: they take no new transfer once the main thread has given up, and the process
        ends soon after (exit 1 or 75) without waiting for them.
        """
        if not transfers:
            return
        todo: queue.SimpleQueue = queue.SimpleQueue()
        done: queue.SimpleQueue = queue.SimpleQueue()
        for transfer in transfers:
            todo.put(transfer)
        stopped = threading.Event()

        def work() -> None:
            while not stopped.is_set():
                try:
                    transfer = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    transfer()
                    done.put(None)
                except Exception as error:  # handed to the main thread, which raises it
                    done.put(error)

        for _ in range(min(self.max_workers, len(transfers))):
            threading.Thread(target=work, daemon=True).start()
        errors: list[Exception] = []
        give_up_at = time.monotonic() + self.deadline
        try:
            with Progress(step, len(transfers), "objects", logger) as progress:
                for _ in transfers:
                    try:
                        result = done.get(timeout=max(0.0, give_up_at - time.monotonic()))
                    except queue.Empty:  # reported by _remote as "still failing after retrying"
                        raise api_exceptions.RetryError("no transfer succeeded",
                                                        errors[-1] if errors else None) from None
                    progress.advance()
                    if result is None:
                        give_up_at = time.monotonic() + self.deadline
                    else:
                        errors.append(result)
        except BaseException:
            stopped.set()  # given up, or a signal: the threads take nothing more
            raise
        if errors:
            raise errors[0]

    def not_found_cause(self, bucket_name: str) -> str:
        if not self.client.bucket(bucket_name).exists(retry=self.retry):
            return f"bucket {bucket_name!r} does not exist"
        return "no such object"


@contextlib.contextmanager
def _remote(uri: str, retry_deadline: float,
            max_workers: int = DEFAULT_MAX_WORKERS) -> Iterator[_Remote]:
    """A client for one call; every failure inside becomes a one-line StorageError naming uri."""
    bucket_name, _ = _split(uri)
    try:
        # project=None: object reads and writes need no project, so none has to be configured.
        client = gcs.Client(project=None)
    except auth_exceptions.DefaultCredentialsError as error:
        raise StorageError(f"{uri}: no Application Default Credentials ({_one_line(error)})") from None
    remote = _Remote(client, DEFAULT_RETRY.with_timeout(retry_deadline), max_workers,
                     retry_deadline)
    try:
        yield remote
    except StorageError:
        raise
    except api_exceptions.NotFound:
        raise StorageError(f"{uri}: {remote.not_found_cause(bucket_name)}") from None
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as error:
        raise StorageError(f"{uri}: access denied ({_one_line(error)})") from None
    except api_exceptions.RetryError as error:
        raise StorageError(
            f"{uri}: {client.api_endpoint} still failing after retrying for {retry_deadline:g} s "
            f"({_one_line(error.cause or error)})") from None
    except (api_exceptions.GoogleAPICallError, auth_exceptions.GoogleAuthError,
            DataCorruption, InvalidResponse, OSError) as error:
        raise StorageError(f"{uri}: {_one_line(error)}") from None
    finally:
        client.close()


def _one_line(error: BaseException, limit: int = 300) -> str:
    error = _innermost(error)
    text = " ".join(str(error).split()) or "no details"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _innermost(error: BaseException) -> BaseException:
    """The root cause inside wrapped connection errors (requests -> urllib3 -> socket)."""
    while True:
        inner = getattr(error, "reason", None)
        if not isinstance(inner, BaseException) and error.args:
            inner = error.args[0]
        if not isinstance(inner, BaseException):
            return error
        error = inner


def _split(uri: str) -> tuple[str, str]:
    """gs://bucket/some/key/ -> ("bucket", "some/key")."""
    bucket_name, _, key = str(uri)[len(GCS_SCHEME):].partition("/")
    if not bucket_name:
        raise StorageError(f"{uri}: no bucket name (expected gs://bucket/prefix)")
    return bucket_name, key.strip("/")


def _as_prefix(key: str) -> str:
    """The listing prefix of a directory-like key: "data" lists data/..., never data2/..."""
    return f"{key}/" if key else ""


def _object_name(key: str, path: Path, local_dir: Path) -> str:
    return _as_prefix(key) + path.relative_to(local_dir).as_posix()


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _files_under(directory: Path) -> Iterator[Path]:
    return (path for path in sorted(directory.rglob("*")) if path.is_file())


def _is_current(path: Path, blob: gcs.Blob) -> bool:
    """True when path holds exactly the object's bytes, judged by size and checksum."""
    if not path.is_file() or path.stat().st_size != blob.size:
        return False
    if blob.crc32c:
        checksum = google_crc32c.Checksum()
        expected = blob.crc32c
    elif blob.md5_hash:
        checksum = hashlib.md5()
        expected = blob.md5_hash
    else:
        return False
    with path.open("rb") as file:
        while chunk := file.read(CHECKSUM_CHUNK_BYTES):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii") == expected


def _remove_unlisted(local_dir: Path, listed: set[str]) -> int:
    """Deletes files under local_dir that are not in listed (relative posix paths); counts them."""
    if not local_dir.is_dir():
        return 0
    unlisted = [path for path in _files_under(local_dir)
                if path.relative_to(local_dir).as_posix() not in listed]
    for path in unlisted:
        path.unlink()
    return len(unlisted)


def _copy_file(source: Path, target: Path) -> int:
    """Copies under a temporary name and renames, so target is never seen half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    shutil.copy2(source, partial)
    os.replace(partial, target)
    return target.stat().st_size


def _mirror_local(source: Path, target: Path, allow_empty: bool) -> TransferStats:
    """Local counterpart of pull_tree and sync_up: target becomes a copy of source."""
    if not source.is_dir():
        if allow_empty and not source.exists():
            return TransferStats(removed=_remove_unlisted(target, set()))
        raise StorageError(f"{source}: no such directory" if not source.exists()
                           else f"{source}: is a file, expected a directory")
    start = time.monotonic()
    relatives = {path.relative_to(source).as_posix() for path in _files_under(source)}
    if source.resolve() == target.resolve():
        return TransferStats(cached=len(relatives))
    changed = [relative for relative in sorted(relatives)
               if not _same_file(source / relative, target / relative)]
    size = sum(_copy_file(source / relative, target / relative) for relative in changed)
    removed = _remove_unlisted(target, relatives)
    return TransferStats(len(changed), size, len(relatives) - len(changed), removed,
                         time.monotonic() - start)


def _same_file(source: Path, target: Path) -> bool:
    if not target.is_file():
        return False
    a, b = source.stat(), target.stat()
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def _log(verb: str, source: object, destination: object, stats: TransferStats,
         level: int = logging.INFO) -> None:
    logger.log(level, "%s %s -> %s: %d objects, %.2f MB in %.2f s (%.2f MB/s); %d already "
               "current, %d removed", verb, source, destination, stats.objects,
               stats.bytes / 1e6, stats.seconds, stats.mb_per_s, stats.cached, stats.removed)
