"""Pointer: one small object (CURRENT.json) read with a version token and replaced only if unchanged.

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
import os
import uuid
from pathlib import Path

from google.api_core import exceptions as api_exceptions

import storage

ABSENT = ""  # the token of an object that does not exist (local); gs:// uses generation 0


def read(uri: str, *, retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> tuple[bytes | None, str]:
    """(the object's bytes or None when it does not exist, its token)."""
    if not storage.is_remote(uri):
        path = Path(uri)
        if not path.is_file():
            return None, ABSENT
        data = path.read_bytes()
        return data, _digest(data)
    bucket_name, key = storage._split(uri)
    with storage._remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry)
        if blob is None:
            return None, "0"
        generation = blob.generation  # (the download may reset the blob's properties)
        # The bytes of that very generation, even if a newer one lands in between.
        return blob.download_as_bytes(retry=remote.retry, if_generation_match=generation), \
            str(generation)


def replace(uri: str, data: bytes, token: str, *,
            retry_deadline: float = storage.DEFAULT_RETRY_DEADLINE_S) -> bool:
    """Writes data to uri if it still holds the version `token` names; False when it changed."""
    if not storage.is_remote(uri):
        return _replace_local(Path(uri), data, token)
    bucket_name, key = storage._split(uri)
    with storage._remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).blob(key)
        try:
            blob.upload_from_string(data, content_type="application/json",
                                    if_generation_match=int(token), retry=remote.retry)
            return True
        except api_exceptions.PreconditionFailed:
            pass
    # A retried request whose first attempt had landed fails its precondition too: ours won.
    return read(uri, retry_deadline=retry_deadline)[0] == data


def _replace_local(path: Path, data: bytes, token: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(f".{path.name}.lock")):
        current = path.read_bytes() if path.is_file() else None
        if (ABSENT if current is None else _digest(current)) != token:
            return False
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
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
