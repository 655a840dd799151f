"""Storage: every URI the job reads or writes, local paths and gs://bucket/prefix alike.

The rest of the job works on local directories only; this module turns URIs into local paths
(pulling remote data into a cache) and publishes finished local directories back to their URI.
"""
from __future__ import annotations

import shutil
from pathlib import Path

GCS_SCHEME = "gs://"


class StorageError(Exception):
    """A URI could not be read or written; the message names the URI and the cause."""


def is_remote(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a local path or a gs:// URI."""
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def exists(uri: str) -> bool:
    """True when the file, object, directory or prefix exists."""
    if is_remote(uri):
        raise StorageError(f"{uri}: gs:// is not supported yet")
    return Path(uri).exists()


def fetch_tree(uri: str, cache_dir: Path) -> Path:
    """Returns a local directory holding everything under uri (pulled into cache_dir if remote)."""
    if is_remote(uri):
        raise StorageError(f"{uri}: gs:// is not supported yet")
    path = Path(uri)
    if not path.exists():
        raise StorageError(f"{uri}: no such directory")
    if not path.is_dir():
        raise StorageError(f"{uri}: is a file, expected a directory of class folders")
    return path


def fetch_file(uri: str, cache_dir: Path) -> Path:
    """Returns a local path holding the file at uri (downloaded into cache_dir if remote)."""
    if is_remote(uri):
        raise StorageError(f"{uri}: gs:// is not supported yet")
    path = Path(uri)
    if not path.is_file():
        raise StorageError(f"{uri}: no such file")
    return path


def local_dir_for(uri: str, cache_dir: Path) -> Path:
    """The local directory to write into before publishing to uri: uri itself when it is local."""
    if is_remote(uri):
        raise StorageError(f"{uri}: gs:// is not supported yet")
    return Path(uri)


def publish_tree(local_dir: Path, uri: str, last: str | None = None) -> None:
    """Copies local_dir to uri, the file named `last` after every other one (the completion marker)."""
    if not is_remote(uri) and Path(uri).resolve() == Path(local_dir).resolve():
        return
    if is_remote(uri):
        raise StorageError(f"{uri}: gs:// is not supported yet")
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for source in files:
        target = Path(uri, source.relative_to(local_dir))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
