"""Objects: one file, local or gs://, read, written and deleted whole, on a condition where asked.

Everything that handles one object by itself, rather than a tree, goes through here: a run's
claim (job/results/writer.py), its recorded JSON (job/results/identity.py), the export's files
beside a run (export/target.py) and the CURRENT.json pointer (job/promotion/pointer.py). A reader
sees the old file or the new one, never part of one. The condition is stated one of two ways:

- by generation, on gs:// only: `read_version` gives the bytes together with the generation they
  are of (a newer one landing meanwhile does not mix in); `write` and `delete_if` act only while
  the live generation is the one stated (0: there is no object), else say they did not.
- by content, local and gs://: `put(exclusive=True)` creates a file only where there is none
  (gs:// `ifGenerationMatch=0`, locally a hard link, which fails on an existing name), raising
  Exists otherwise; `delete_if_unchanged` deletes a file only while it still holds the bytes the
  caller proved it wrote (their SHA-256; on gs:// the delete is conditional on the generation
  that was hashed).

Failures raise storage's errors, one line naming the URI.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

from google.api_core import exceptions as api_exceptions

from storage import files
from storage.errors import StorageError
from storage.gcs import DEFAULT_RETRY_DEADLINE_S, REQUEST_TIMEOUT_S, connect
from storage.uris import is_remote, split

# What a request conditional on a generation meets where that generation is no longer live.
_REPLACED = (api_exceptions.PreconditionFailed, api_exceptions.NotFound)


class Exists(StorageError):
    """An exclusive create found the name taken."""


class Version(NamedTuple):
    """The bytes of a gs:// object and the generation they are of."""

    data: bytes
    generation: int


def read(uri: str, *, retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> bytes | None:
    """The bytes of the file at uri, or None when there is none (for small files: all in memory).
    On gs:// they are of one generation; one replaced during the read raises StorageError."""
    if not is_remote(uri):
        path = Path(uri)
        return path.read_bytes() if path.is_file() else None
    version = read_version(uri, retry_deadline=retry_deadline)
    return None if version is None else version.data


def read_version(uri: str, *, none_if_replaced: bool = False,
                 retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> Version | None:
    """The live object at the gs:// uri, or None when there is none. The bytes are those of the
    generation found first, even if a newer one lands in between; that generation replaced
    before its bytes are read raises StorageError, or gives None with none_if_replaced (a caller
    that then treats the object as gone, to look again or to leave it be)."""
    bucket_name, key = _gs_split(uri)
    with connect(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).get_blob(key, retry=remote.retry)
        if blob is None:
            return None
        generation = blob.generation  # (the download may reset the blob's properties)
        try:
            data = blob.download_as_bytes(retry=remote.retry, timeout=REQUEST_TIMEOUT_S,
                                          if_generation_match=generation)
        except _REPLACED:
            if none_if_replaced:
                return None
            raise
        return Version(data, generation)


def write(uri: str, data: bytes | Path, *, if_generation: int | None = None,
          content_type: str | None = None, retried_is_ours: bool = False,
          retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> int | None:
    """Writes data (bytes, or the file at a Path) to the gs:// uri whole, and returns the new
    generation. With if_generation, only where the live generation is that one (0: where there
    is no object), else returns None. content_type: the object's (None: the library's guess
    from a file's name, text/plain for bytes).

    retried_is_ours: a write whose answer was lost is retried by the library, and the retry is
    then refused by the very condition the first attempt met; so where the object now holds
    exactly data, the write is taken as this one's own and its generation returned."""
    bucket_name, key = _gs_split(uri)
    typed = {} if content_type is None else {"content_type": content_type}
    with connect(uri, retry_deadline) as remote:
        blob = remote.client.bucket(bucket_name).blob(key)
        upload, source = (blob.upload_from_filename, str(data)) if isinstance(data, Path) \
            else (blob.upload_from_string, data)
        try:
            upload(source, **typed, if_generation_match=if_generation, retry=remote.retry,
                   timeout=REQUEST_TIMEOUT_S)
            return blob.generation
        except api_exceptions.PreconditionFailed:
            pass
    if retried_is_ours:
        found = read_version(uri, none_if_replaced=True, retry_deadline=retry_deadline)
        sent = data.read_bytes() if isinstance(data, Path) else data
        if found is not None and found.data == sent:
            return found.generation
    return None


def put(path: Path, uri: str, *, exclusive: bool = False,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> None:
    """Writes the file at path to uri whole. exclusive: only where uri holds no file yet; Exists
    otherwise."""
    if not is_remote(uri):
        try:
            (files.create_exclusively if exclusive else files.copy_file)(Path(path), Path(uri))
        except FileExistsError:
            raise Exists(f"{uri}: already exists") from None
        return
    if write(uri, Path(path), if_generation=0 if exclusive else None,
             retry_deadline=retry_deadline) is None:
        raise Exists(f"{uri}: already exists")


def delete_if(uri: str, generation: int, *,
              retry_deadline: float = DEFAULT_RETRY_DEADLINE_S) -> bool:
    """Deletes the gs:// object at uri only if its live generation is `generation`; says whether
    it did."""
    bucket_name, key = _gs_split(uri)
    with connect(uri, retry_deadline) as remote:
        try:
            remote.client.bucket(bucket_name).blob(key).delete(
                if_generation_match=generation, retry=remote.retry, timeout=REQUEST_TIMEOUT_S)
        except _REPLACED:
            return False
        return True


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
    # Replaced or deleted since it was hashed: not the file proved, so it stays.
    found = read_version(uri, none_if_replaced=True, retry_deadline=retry_deadline)
    if found is None or hashlib.sha256(found.data).hexdigest() != sha256:
        return False
    return delete_if(uri, found.generation, retry_deadline=retry_deadline)


def _gs_split(uri: str) -> tuple[str, str]:
    """(bucket, key) of a gs:// uri; a local path is a caller's mistake here, said at once."""
    if not is_remote(uri):
        raise ValueError(f"{uri}: generations are of gs:// objects; a local path has none")
    return split(uri)
