"""Storage: every URI the job reads or writes, local paths and gs://bucket/prefix alike.

The rest of the job works on local directories only; this module turns URIs into local paths
(pulling remote data into a cache) and publishes finished local directories back to their URI.

Remote URIs go through google-cloud-storage with Application Default Credentials (Workload
Identity on GKE, the attached service account on Vertex AI). When STORAGE_EMULATOR_HOST is set
the client library itself talks to that endpoint with anonymous credentials. Transient failures
(429, 5xx, timeouts, connection resets) are retried with backoff for up to `retry_deadline`
seconds; anything that still fails raises StorageError with one line naming the URI and the cause.

Transfers of many objects run in parallel through transfer_manager (threads: the job has
TensorFlow loaded, which must not be forked), in bounded batches fed from the listing as it pages,
so a prefix of any size never sits in memory as a whole. Each transfer returns TransferStats,
which is also logged on the "job.storage" logger.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs
from google.cloud.storage import transfer_manager
from google.cloud.storage.retry import DEFAULT_RETRY
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

GCS_SCHEME = "gs://"
DEFAULT_RETRY_DEADLINE_S = 120.0
DEFAULT_MAX_WORKERS = 8
DEFAULT_BATCH_SIZE = 1000
PARTIAL_SUFFIX = ".partial"
CHECKSUM_CHUNK_BYTES = 1 << 20

logger = logging.getLogger("job.storage")
T = TypeVar("T")


class StorageError(Exception):
    """A URI could not be read or written; the message names the URI and the cause."""


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """What one pull or push moved: `objects`/`bytes` transferred, `cached` already up to date
    (not transferred), `removed` deleted from the destination to mirror the source."""

    objects: int = 0
    bytes: int = 0
    cached: int = 0
    removed: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        """The stats as plain numbers for metrics.json."""
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3),
                "mb_per_s": round(self.mb_per_s, 3)}


def is_remote(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


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
              batch_size: int = DEFAULT_BATCH_SIZE, max_workers: int = DEFAULT_MAX_WORKERS,
              retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> TransferStats:
    """Makes local_dir a mirror of everything under uri and says what that moved.

    Files already there with the size and checksum of their object are kept (a re-run pulls only
    what is missing or changed); files under local_dir that are not under uri are deleted. Each
    download goes to a temporary name and is renamed only when complete and verified.
    An empty or absent prefix raises StorageError unless allow_empty.
    """
    local_dir = Path(local_dir)
    if not is_remote(uri):
        return _mirror_local(Path(uri), local_dir, allow_empty=allow_empty)
    start = time.monotonic()
    bucket_name, key = _split(uri)
    prefix = _as_prefix(key)
    listed: set[str] = set()
    objects = size = cached = 0
    with _remote(uri, retry_deadline, max_workers) as remote:
        listing = remote.client.list_blobs(bucket_name, prefix=prefix, retry=remote.retry)
        for batch in _batches(listing, batch_size):
            missing = []
            for blob in batch:
                if blob.name.endswith("/"):
                    continue  # a zero-byte "folder" placeholder made by the console
                relative = blob.name[len(prefix):]
                listed.add(relative)
                target = _local_path(local_dir, relative, uri)
                if _is_current(target, blob):
                    cached += 1
                else:
                    missing.append((blob, target))
            remote.download(missing)
            objects += len(missing)
            size += sum(blob.size or 0 for blob, _ in missing)
    if not listed and not allow_empty:
        raise StorageError(f"{uri}: no objects under this prefix")
    removed = _remove_unlisted(local_dir, listed)
    stats = TransferStats(objects, size, cached, removed, time.monotonic() - start)
    _log("pulled", uri, local_dir, stats)
    return stats


def sync_down(uri: str, local_dir: Path, **options) -> TransferStats:
    """Mirrors a small directory (checkpoints) from uri into local_dir; nothing there yet is fine."""
    return pull_tree(uri, local_dir, allow_empty=True, **options)


def fetch_file(uri: str, cache_dir: Path, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> Path:
    """Returns a local path holding the file at uri (downloaded into cache_dir if remote)."""
    if not is_remote(uri):
        path = Path(uri)
        if not path.is_file():
            raise StorageError(f"{uri}: no such file")
        return path
    bucket_name, key = _split(uri)
    target = local_dir_for(uri, cache_dir)
    with _remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry) if key else None
        if blob is None:
            raise StorageError(f"{uri}: {remote.not_found_cause(bucket_name)}")
        if not _is_current(target, blob):
            remote.download([(blob, target)])
    return target


def publish_tree(local_dir: Path, uri: str, last: str | None = None, *,
                 max_workers: int = DEFAULT_MAX_WORKERS,
                 retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> TransferStats:
    """Copies local_dir to uri, the file named `last` (the completion marker) after every other one
    has been written, so a reader never takes a half-written run for a complete one.

    Raises StorageError when uri already holds `last`: a completed run is never overwritten.
    """
    local_dir = Path(local_dir)
    marker = local_dir / last if last else None
    if marker is not None and not marker.is_file():
        raise StorageError(f"{marker}: completion marker missing, nothing published to {uri}")
    if not is_remote(uri) and Path(uri).resolve() == local_dir.resolve():
        return TransferStats()
    if last and exists(join(uri, last), retry_deadline=retry_deadline):
        raise StorageError(f"{uri}: already holds a completed run ({last}); refusing to overwrite it")
    start = time.monotonic()
    files = (path for path in _files_under(local_dir) if path != marker)
    if not is_remote(uri):
        copied = [_copy_file(path, Path(uri, path.relative_to(local_dir)))
                  for path in [*files, *([marker] if marker else [])]]
        stats = TransferStats(len(copied), sum(copied), seconds=time.monotonic() - start)
        _log("published", local_dir, uri, stats)
        return stats
    bucket_name, key = _split(uri)
    objects = size = 0
    with _remote(uri, retry_deadline, max_workers) as remote:
        bucket = remote.client.bucket(bucket_name)
        for batch in _batches(files, DEFAULT_BATCH_SIZE):
            size += remote.upload([(path, bucket.blob(_object_name(key, path, local_dir)))
                                   for path in batch])
            objects += len(batch)
        if marker is not None:
            try:
                size += remote.upload([(marker, bucket.blob(_object_name(key, marker, local_dir)))],
                                      if_generation_match=0)
            except api_exceptions.PreconditionFailed:
                raise StorageError(f"{uri}: another writer completed this run first ({last}); "
                                   "refusing to overwrite it") from None
            objects += 1
    stats = TransferStats(objects, size, seconds=time.monotonic() - start)
    _log("published", local_dir, uri, stats)
    return stats


def sync_up(local_dir: Path, uri: str, *, max_workers: int = DEFAULT_MAX_WORKERS,
            retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> TransferStats:
    """Mirrors a small local directory (checkpoints) to uri: uploads new and changed files and
    deletes objects under uri that local_dir no longer has."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: no such directory to sync to {uri}")
    if not is_remote(uri):
        return _mirror_local(local_dir, Path(uri), allow_empty=True)
    start = time.monotonic()
    bucket_name, key = _split(uri)
    prefix = _as_prefix(key)
    with _remote(uri, retry_deadline, max_workers) as remote:
        bucket = remote.client.bucket(bucket_name)
        remote_blobs = {blob.name: blob for blob in
                        remote.client.list_blobs(bucket_name, prefix=prefix, retry=remote.retry)}
        local_files = {_object_name(key, path, local_dir): path for path in _files_under(local_dir)}
        changed = [(path, bucket.blob(name)) for name, path in local_files.items()
                   if name not in remote_blobs or not _is_current(path, remote_blobs[name])]
        size = remote.upload(changed)
        stale = [blob for name, blob in remote_blobs.items() if name not in local_files]
        for blob in stale:
            blob.delete(retry=remote.retry)
    stats = TransferStats(len(changed), size, len(local_files) - len(changed), len(stale),
                          time.monotonic() - start)
    _log("synced", local_dir, uri, stats)
    return stats


@dataclasses.dataclass(frozen=True)
class _Remote:
    """One client with the retry policy and parallelism every request of one call uses."""

    client: gcs.Client
    retry: api_retry.Retry
    max_workers: int

    def download(self, blobs_and_targets: list[tuple[gcs.Blob, Path]]) -> None:
        """Downloads in parallel, each to a temporary name renamed into place once complete;
        the downloads that succeeded are kept when others fail, then the first failure raises."""
        if not blobs_and_targets:
            return
        partials = [target.with_name(target.name + PARTIAL_SUFFIX) for _, target in blobs_and_targets]
        for partial in partials:
            partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            results = transfer_manager.download_many(
                [(blob, str(partial)) for (blob, _), partial in zip(blobs_and_targets, partials)],
                download_kwargs={"retry": self.retry},
                worker_type=transfer_manager.THREAD, max_workers=self.max_workers)
            for result, partial, (_, target) in zip(results, partials, blobs_and_targets):
                if not isinstance(result, Exception):
                    os.replace(partial, target)
        finally:
            for partial in partials:
                partial.unlink(missing_ok=True)
        _raise_first(results)

    def upload(self, files_and_blobs: list[tuple[Path, gcs.Blob]], **upload_kwargs) -> int:
        """Uploads in parallel and returns the bytes sent; the first failure raises."""
        if not files_and_blobs:
            return 0
        results = transfer_manager.upload_many(
            [(str(path), blob) for path, blob in files_and_blobs],
            upload_kwargs={"retry": self.retry, **upload_kwargs},
            worker_type=transfer_manager.THREAD, max_workers=self.max_workers)
        _raise_first(results)
        return sum(path.stat().st_size for path, _ in files_and_blobs)

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
    remote = _Remote(client, DEFAULT_RETRY.with_timeout(retry_deadline), max_workers)
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


def _raise_first(results: list) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise result


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


def _local_path(local_dir: Path, relative: str, uri: str) -> Path:
    parts = [part for part in relative.split("/") if part]
    if not parts or ".." in parts or parts[-1].endswith(PARTIAL_SUFFIX):
        raise StorageError(f"{uri}: object name {relative!r} cannot be stored as a local file")
    return local_dir.joinpath(*parts)


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


def _log(verb: str, source: object, destination: object, stats: TransferStats) -> None:
    logger.info("%s %s -> %s: %d objects, %.2f MB in %.2f s (%.2f MB/s); %d already current, "
                "%d removed", verb, source, destination, stats.objects, stats.bytes / 1e6,
                stats.seconds, stats.mb_per_s, stats.cached, stats.removed)
