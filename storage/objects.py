"""Objects: single files, local or gs://, read, written and deleted on a condition.

What a program that shares a folder with others needs beside storage's whole-tree transfers:
read a small file (None where there is none); write a file, or create it only where none is
(gs:// `ifGenerationMatch=0`, locally a hard link, which fails on an existing name); and delete a
file only while it still holds the bytes the caller proved it wrote (its SHA-256; on gs:// the
delete is conditional on the generation that was hashed). Failures raise storage's errors,
one line naming the URI.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from google.api_core import exceptions as api_exceptions

from storage import (
    DEFAULT_RETRY_DEADLINE_S,
    PARTIAL_SUFFIX,
    REQUEST_TIMEOUT_S,
    StorageError,
    _remote,
    _split,
    is_remote,
)


class Exists(StorageError):
    """An exclusive create found the name taken."""


def read(uri: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> bytes | None:
    """The bytes of the file at uri, or None when there is none (for small files: all in memory)."""
    if not is_remote(uri):
        path = Path(uri)
        return path.read_bytes() if path.is_file() else None
    bucket_name, key = _split(uri)
    with _remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry)
        return None if blob is None else blob.download_as_bytes(
            retry=remote.retry, timeout=REQUEST_TIMEOUT_S, if_generation_match=blob.generation)


def put(path: Path, uri: str, *, exclusive: bool = False,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> None:
    """Writes the file at path to uri whole (a reader sees the old file or the new one, never
    part of one). exclusive: only where uri holds no file yet; Exists otherwise."""
    if not is_remote(uri):
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        shutil.copy2(path, partial)
        try:
            if exclusive:
                os.link(partial, target)
            else:
                os.replace(partial, target)
        except FileExistsError:
            raise Exists(f"{uri}: already exists") from None
        finally:
            partial.unlink(missing_ok=True)
        return
    bucket_name, key = _split(uri)
    with _remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).blob(key)
        try:
            blob.upload_from_filename(str(path), retry=remote.retry, timeout=REQUEST_TIMEOUT_S,
                                      **({"if_generation_match": 0} if exclusive else {}))
        except api_exceptions.PreconditionFailed:
            raise Exists(f"{uri}: already exists") from None


def delete_if_unchanged(uri: str, sha256: str, *,
                        retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> bool:
    """Deletes the file at uri if it holds bytes of this SHA-256; True when it did. False, and
    the file stays, when there is none or it holds other bytes (someone else's now)."""
    if not is_remote(uri):
        path = Path(uri)
        if not path.is_file():
            return False
        with path.open("rb") as stream:
            if hashlib.file_digest(stream, "sha256").hexdigest() != sha256:
                return False
        path.unlink()
        return True
    bucket_name, key = _split(uri)
    with _remote(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry)
        if blob is None:
            return False
        try:
            content = blob.download_as_bytes(retry=remote.retry, timeout=REQUEST_TIMEOUT_S,
                                             if_generation_match=blob.generation)
            if hashlib.sha256(content).hexdigest() != sha256:
                return False
            blob.delete(retry=remote.retry, timeout=REQUEST_TIMEOUT_S,
                        if_generation_match=blob.generation)
        except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
            return False  # replaced or deleted since it was hashed: not the file proved
    return True
