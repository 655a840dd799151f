"""GCS: the client every gs:// call goes through, its retries, its transfer threads, its errors.

Remote URIs go through google-cloud-storage with Application Default Credentials (Workload
Identity on GKE, the attached service account on Vertex AI). When STORAGE_EMULATOR_HOST is set
the client library itself talks to that endpoint with anonymous credentials. `connect` opens one
client for one call: transient failures (429, 5xx, timeouts, connection resets) are retried with
backoff for up to `retry_deadline` seconds; anything that still fails raises StorageError with
one line naming the URI and the cause.

Transfers of many objects run in parallel on threads (the job has TensorFlow loaded, which must
not be forked). A call gives up when `retry_deadline` seconds pass with no transfer succeeding,
and a signal (SIGTERM) stops it at once, keeping every file already finished.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from common.progress import Progress
from storage import diskspace
from storage.errors import StorageError
from storage.uris import PARTIAL_SUFFIX, split

DEFAULT_RETRY_DEADLINE_S = 120.0
DEFAULT_MAX_WORKERS = 8
REQUEST_TIMEOUT_S = (10, 60)  # connect, read: a silent endpoint fails a request, not the job
CHECKSUM_CHUNK_BYTES = 1 << 20

logger = logging.getLogger("storage")


@dataclasses.dataclass(frozen=True)
class Remote:
    """One client with the retry policy and parallelism every request of one call uses."""

    client: gcs.Client
    retry: api_retry.Retry
    max_workers: int
    deadline: float  # seconds without any transfer finishing before the call gives up

    def download(self, blobs_and_targets: list[tuple[gcs.Blob, Path]]) -> None:
        """Downloads in parallel, each to a temporary name renamed into place as soon as it is
        complete, so a failure or a SIGTERM keeps every download that had finished."""
        self._parallel("downloading", [functools.partial(self._download, blob, target)
                                       for blob, target in blobs_and_targets])

    def _download(self, blob: gcs.Blob, target: Path) -> None:
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
        try:
            self._wait(step, len(transfers), done)
        except BaseException:
            stopped.set()  # given up, or a signal: the threads take nothing more
            raise

    def _wait(self, step: str, count: int, done: queue.SimpleQueue) -> None:
        """Collects count outcomes from done, then raises the first failure among them."""
        errors: list[Exception] = []
        give_up_at = time.monotonic() + self.deadline
        with Progress(step, count, "objects", logger) as progress:
            for _ in range(count):
                try:
                    result = done.get(timeout=max(0.0, give_up_at - time.monotonic()))
                except queue.Empty:  # reported by connect as "still failing after retrying"
                    raise api_exceptions.RetryError("no transfer succeeded",
                                                    errors[-1] if errors else None) from None
                progress.advance()
                if result is None:
                    give_up_at = time.monotonic() + self.deadline
                else:
                    errors.append(result)
        if errors:
            raise errors[0]

    def not_found_cause(self, bucket_name: str) -> str:
        if not self.client.bucket(bucket_name).exists(retry=self.retry):
            return f"bucket {bucket_name!r} does not exist"
        return "no such object"


@contextlib.contextmanager
def connect(uri: str, retry_deadline: float,
            max_workers: int = DEFAULT_MAX_WORKERS) -> Iterator[Remote]:
    """A client for one call; every failure inside becomes a one-line StorageError naming uri."""
    bucket_name, _ = split(uri)
    try:
        # project=None: object reads and writes need no project, so none has to be configured.
        client = gcs.Client(project=None)
    except auth_exceptions.DefaultCredentialsError as error:
        raise StorageError(f"{uri}: no Application Default Credentials ({_one_line(error)})") from None
    remote = Remote(client, DEFAULT_RETRY.with_timeout(retry_deadline), max_workers,
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


def is_current(path: Path, blob: gcs.Blob) -> bool:
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
