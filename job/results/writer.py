"""Writer: a run is published by one writer, and a complete run is never modified.

Before the chief writes anything of a run (checkpoints included) it claims the run: a claim
object, `OUTPUT_URI/RUN_ID/WRITER.json`, created only where there is none and naming this process.
A second process of the same RUN_ID (a duplicate Job, or the replacement pod Kubernetes starts
while the old one is still terminating) waits for the claim to be released, at most WAIT_S, and
then gives up with WrittenElsewhere (exit 2, retrying cannot help); if the run was completed
meanwhile it finds it complete instead. So two processes never train one run side by side, nor
share its checkpoints, nor publish it twice.

- **gs://**: the claim is created with `ifGenerationMatch=0` and refreshed every HEARTBEAT_S by a
  thread, each refresh conditional on the generation the last one made. A claim whose generation
  has not changed for STALE_AFTER_S (measured on the waiting process's own clock: no two hosts'
  clocks are compared) belongs to a writer that died without releasing it (SIGKILL, a lost node),
  and is taken over on condition of that very generation, so of two waiters only one succeeds. A
  writer whose claim was taken over finds out at its next refresh and can no longer publish.
- **Local folders**: the claim file is locked with flock(2), which the kernel releases when the
  process ends however it ends, so a local claim is never stale and needs no heartbeat.

Publishing re-checks the claim first, then goes through storage.publish_tree, whose uploads are
conditional too (see there): even a writer that lost its claim between the check and the upload
cannot land a file over a run that another writer completed. Each attempt writes the run into
an empty staging folder in the job's cache, so nothing a killed attempt left (a truncated
`saved_model.pb.tmp...`) is ever listed in a MANIFEST.json or published.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import storage
from common import run_files
from storage import objects

CLAIM = "WRITER.json"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 150.0  # more than the pod's terminationGracePeriodSeconds (120) before a SIGKILL
WAIT_S = 300.0  # long enough to see a stale claim go stale, or a terminating pod release its own
POLL_S = 2.0

log = logging.getLogger("job")


class WrittenElsewhere(storage.Conflict):
    """Another process is writing this run, or took it over: this one must not write it."""


@contextlib.contextmanager
def claimed(run_uri: str, *, wait_s: float = WAIT_S, stale_after_s: float = STALE_AFTER_S,
            heartbeat_s: float = HEARTBEAT_S, poll_s: float = POLL_S,
            retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> Iterator["Claim | None"]:
    """Holds the claim on the run at run_uri for the block, and releases it however the block
    ends (a SIGTERM included, before the job exits 75, so that the next pod can resume at once).
    Yields None, claiming nothing, when the run is complete. Raises WrittenElsewhere when another
    process holds a live claim for all of wait_s."""
    kind = RemoteClaim if storage.is_remote(run_uri) else LocalClaim
    claim = kind.take(run_uri, wait_s=wait_s, stale_after_s=stale_after_s,
                      heartbeat_s=heartbeat_s, poll_s=poll_s, retry_deadline=retry_deadline)
    try:
        yield claim
    finally:
        if claim is not None:
            claim.release()


def publish(claim: "Claim | None", local_dir: Path, run_uri: str, *,
            retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> storage.TransferStats:
    """Publishes the run written in local_dir to run_uri, MANIFEST.json last, if this process
    still holds its claim (None: there is none to check, the uploads' conditions alone guard);
    raises WrittenElsewhere or storage.Conflict rather than write over another writer's run."""
    if claim is not None:
        claim.verify()
    stats = storage.publish_tree(local_dir, run_uri, last=run_files.MANIFEST,
                                 retry_deadline=retry_deadline)
    if claim is not None:
        claim.done()
    return stats


def fresh_staging(folder: Path) -> Path:
    """Empties (or makes) the folder an attempt writes its run into before publishing it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def remove_leftover_claim(run_uri: str, *,
                          retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> bool:
    """Removes the claim a writer killed after completing the run left behind (no one writes a
    complete run, so no live writer needs it); says whether there was one. Only a claim this job
    wrote is removed: an object that is not one stays."""
    uri = storage.join(run_uri, CLAIM)
    if storage.is_remote(uri):
        found = objects.read_version(uri, none_if_replaced=True, retry_deadline=retry_deadline)
        if found is None or _holder(found.data) is None:
            return False
        return objects.delete_if(uri, found.generation, retry_deadline=retry_deadline)
    path = Path(uri)
    with contextlib.suppress(FileNotFoundError), _opened(path) as descriptor:
        if _holder(path.read_bytes()) is not None and _locked(descriptor, path):
            path.unlink()
            return True
    return False


class Claim:
    """This process's claim on one run. `verify` raises WrittenElsewhere when it no longer holds
    it; `release` gives it up (idempotent)."""

    def __init__(self, uri: str):
        self.uri = uri  # of the claim object or file
        self.token = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}"

    def content(self) -> bytes:
        return json.dumps({"writer": self.token, "host": socket.gethostname(),
                           "pid": os.getpid(), "at": time.time()}).encode()

    def done(self) -> None:
        """The run is published: the claim has nothing more to guard until it is released."""

    def lost(self, why: str) -> WrittenElsewhere:
        return WrittenElsewhere(f"{self.uri}: {why}; this process ({self.token}) no longer holds "
                                "the run's claim, and publishes nothing")


class RemoteClaim(Claim):
    """A claim object on gs://, kept alive by a heartbeat thread (see the module docstring)."""

    def __init__(self, uri: str, heartbeat_s: float, retry_deadline: float):
        super().__init__(uri)
        self.generation = 0
        self.retry_deadline = retry_deadline
        self.lock = threading.Lock()  # one conditional write at a time: heartbeat or verify
        self.stopped = threading.Event()
        self.taken_by: str | None = None
        self.heartbeat_s = heartbeat_s

    @classmethod
    def take(cls, run_uri: str, *, wait_s: float, stale_after_s: float, heartbeat_s: float,
             poll_s: float, retry_deadline: float) -> "RemoteClaim | None":
        claim = cls(storage.join(run_uri, CLAIM), heartbeat_s, retry_deadline)
        give_up_at = time.monotonic() + wait_s
        unchanged: tuple[int, float] | None = None  # the holder's generation, first seen when
        while not _complete(run_uri, retry_deadline):
            found = objects.read_version(claim.uri, none_if_replaced=True,
                                         retry_deadline=retry_deadline)
            if found is not None and (unchanged is None or unchanged[0] != found.generation):
                if unchanged is None:
                    _log_waiting(run_uri, found.data, wait_s)
                unchanged = (found.generation, time.monotonic())
            stale = found is not None and time.monotonic() - unchanged[1] >= stale_after_s
            if found is None or stale:
                if claim._write(found.generation if found else 0):
                    if stale:
                        log.warning("took over the claim on %s of %s, silent for %.0f s",
                                    run_uri, _holder(found.data), time.monotonic() - unchanged[1])
                    return claim._start(run_uri)
                continue  # another process was quicker: look again at once
            if time.monotonic() >= give_up_at:
                raise _busy(run_uri, found.data, wait_s)
            time.sleep(poll_s)
        return None

    def _start(self, run_uri: str) -> "RemoteClaim | None":
        """Starts the heartbeat, unless the run was completed before the claim was taken."""
        if _complete(run_uri, self.retry_deadline):
            self.release()
            return None
        threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True).start()
        log.info("claimed %s for this process", run_uri)
        return self

    def _write(self, expected: int) -> bool:
        """Writes the claim where its live generation is `expected`; True when it did. A write
        whose answer was lost and retried is refused as a conflict, yet it is this process's own:
        the claim then holds exactly what this process wrote, and is taken to be held."""
        generation = objects.write(self.uri, self.content(), if_generation=expected,
                                   retried_is_ours=True, retry_deadline=self.retry_deadline)
        if generation is None:
            return False
        self.generation = generation
        return True

    def _beat(self) -> None:
        while not self.stopped.wait(self.heartbeat_s):
            try:
                with self.lock:
                    if self.stopped.is_set() or self.taken_by:
                        return
                    if not self._write(self.generation):
                        self.taken_by = "taken over by another process"
                        log.error("%s: %s; this process will not publish", self.uri, self.taken_by)
                        return
            except storage.StorageError as error:  # the next beat tries again
                log.warning("claim heartbeat failed: %s", error)

    def verify(self) -> None:
        """Refreshes the claim now, on condition that it is still this process's."""
        with self.lock:
            if self.taken_by or not self._write(self.generation):
                self.taken_by = self.taken_by or "taken over by another process"
                raise self.lost(self.taken_by)

    def done(self) -> None:
        self.stopped.set()  # no more heartbeats: a rerun may now remove the claim at any time

    def release(self) -> None:
        self.stopped.set()
        with self.lock:
            if self.taken_by or not self.generation:
                return
            try:
                objects.delete_if(self.uri, self.generation, retry_deadline=self.retry_deadline)
            except storage.StorageError as error:  # it goes stale, and is taken over later
                log.warning("could not release the claim %s: %s", self.uri, error)
            self.generation = 0


class LocalClaim(Claim):
    """A claim file under flock(2): held exactly as long as this process holds its descriptor."""

    def __init__(self, uri: str, descriptor: int):
        super().__init__(uri)
        self.descriptor: int | None = descriptor

    @classmethod
    def take(cls, run_uri: str, *, wait_s: float, poll_s: float,
             **_remote_only) -> "LocalClaim | None":
        path = Path(run_uri, CLAIM)
        give_up_at = time.monotonic() + wait_s
        logged = False
        while not _complete(run_uri):
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if _locked(descriptor, path):
                claim = cls(str(path), descriptor)
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, claim.content(), 0)
                if not _complete(run_uri):  # completed while this process waited
                    log.info("claimed %s for this process", run_uri)
                    return claim
                claim.release()
                return None
            os.close(descriptor)
            holder = _read_quietly(path)
            if not logged:
                _log_waiting(run_uri, holder, wait_s)
                logged = True
            if time.monotonic() >= give_up_at:
                raise _busy(run_uri, holder, wait_s)
            time.sleep(poll_s)
        return None

    def verify(self) -> None:
        if self.descriptor is None or not _is_same_file(self.descriptor, Path(self.uri)):
            raise self.lost("the claim file was removed or replaced")

    def release(self) -> None:
        if self.descriptor is None:
            return
        if _is_same_file(self.descriptor, Path(self.uri)):
            Path(self.uri).unlink()  # while still locked: no one holds a lock on a removed file
        os.close(self.descriptor)
        self.descriptor = None


def _locked(descriptor: int, path: Path) -> bool:
    """Locks the open claim file without waiting; True when this descriptor now holds the lock
    on the file that path names (not on one that its holder removed meanwhile)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return _is_same_file(descriptor, path)


def _is_same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), path.stat())
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    descriptor = os.open(path, os.O_RDWR)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _read_quietly(path: Path) -> bytes:
    with contextlib.suppress(OSError):
        return path.read_bytes()
    return b""


def _complete(run_uri: str, retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> bool:
    return storage.exists(storage.join(run_uri, run_files.MANIFEST), retry_deadline=retry_deadline)


def _holder(content: bytes) -> dict | None:
    """A claim's content as this module writes it, or None for anything else."""
    with contextlib.suppress(ValueError, TypeError):
        holder = json.loads(content)
        if isinstance(holder, dict) and isinstance(holder.get("writer"), str):
            return holder
    return None


def _describe(content: bytes) -> str:
    holder = _holder(content)
    return f"pid {holder['pid']} on {holder['host']}" if holder else "an unknown process"


def _log_waiting(run_uri: str, content: bytes, wait_s: float) -> None:
    log.info("%s is being written by %s; waiting up to %.0f s for it to finish or release it",
             run_uri, _describe(content), wait_s)


def _busy(run_uri: str, content: bytes, wait_s: float) -> WrittenElsewhere:
    return WrittenElsewhere(f"{run_uri}: being written by {_describe(content)}, which still held "
                            f"its claim after {wait_s:.0f} s; one process writes a run: rerun "
                            "this RUN_ID once that one has ended, or choose another RUN_ID")
