"""URIs: the rules for every URI and object name, local paths and gs://bucket/key alike.

Pure string and path work, no requests: a setting's URI normalised and checked once
(`normalise_uri`), an object name checked before it becomes a local file (`name_problem`), URIs
joined and split, and the local folder that mirrors a gs:// prefix (`local_dir_for`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from storage.errors import StorageError

GCS_SCHEME = "gs://"
PARTIAL_SUFFIX = ".partial"  # of a file being written, renamed away once it is complete
MAX_NAME_BYTES = 255  # the longest file name ext4, XFS and overlayfs store
BUCKET_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,220}[a-z0-9])?$")  # GCS asks 3+ too


def is_remote(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


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


def split(uri: str) -> tuple[str, str]:
    """gs://bucket/some/key/ -> ("bucket", "some/key")."""
    bucket_name, _, key = str(uri)[len(GCS_SCHEME):].partition("/")
    if not bucket_name:
        raise StorageError(f"{uri}: no bucket name (expected gs://bucket/prefix)")
    return bucket_name, key.strip("/")


def as_prefix(key: str) -> str:
    """The listing prefix of a directory-like key: "data" lists data/..., never data2/..."""
    return f"{key}/" if key else ""


def parent_folders(name: str) -> list[str]:
    """The folders a relative name lies in, outermost first: "a/b/c.jpeg" -> ["a", "a/b"]."""
    parts = name.split("/")
    return ["/".join(parts[:end]) for end in range(1, len(parts))]


def local_dir_for(uri: str, cache_dir: Path) -> Path:
    """The local path that mirrors uri: uri itself when local, cache_dir/bucket/key when remote."""
    if not is_remote(uri):
        return Path(uri)
    bucket_name, key = split(uri)
    return Path(cache_dir, bucket_name, *key.split("/"))
