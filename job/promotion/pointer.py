"""Pointer: one small object (CURRENT.json) read with a version token and replaced only if unchanged.

Built on storage.objects (gs://) and storage.files (local), which own the reads and writes.

Promotion (job/promotion/promote.py) compares a run with the model CURRENT.json names, then switches the
pointer; two runs finishing together must not both switch over each other's comparison. So a
write states the token of the version it compared against, and fails (returns False) when the
object changed since:
- gs://: the object's generation, sent as ifGenerationMatch (0: the object must not exist yet);
  the switch is one atomic object write.
- local: the SHA-256 of the bytes read ("" for no file), checked under an exclusive flock of a
  lock file beside it, then a temporary file renamed over the object: atomic on one filesystem,
  and the lock goes with the process if it dies.
A reader sees the old object or the new one, never part of either.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path

import storage
from storage import files, objects

ABSENT = ""  # the token of an object that does not exist (local); gs:// uses generation 0


def read(uri: str, *, retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> tuple[bytes | None, str]:
    """(the object's bytes or None when it does not exist, its token)."""
    if not storage.is_remote(uri):
        data = objects.read(uri)
        return (None, ABSENT) if data is None else (data, _digest(data))
    found = objects.read_version(uri, retry_deadline=retry_deadline)
    return (None, "0") if found is None else (found.data, str(found.generation))


def replace(uri: str, data: bytes, token: str, *,
            retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> bool:
    """Writes data to uri if it still holds the version `token` names; False when it changed."""
    if not storage.is_remote(uri):
        return _replace_local(Path(uri), data, token)
    return objects.write(uri, data, if_generation=int(token), content_type="application/json",
                         retried_is_ours=True, retry_deadline=retry_deadline) is not None


def _replace_local(path: Path, data: bytes, token: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(f".{path.name}.lock")):
        current = path.read_bytes() if path.is_file() else None
        if (ABSENT if current is None else _digest(current)) != token:
            return False
        files.write_bytes(path, data)
    return True


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
