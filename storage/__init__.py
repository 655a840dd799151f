"""Storage: every URI the job and the export read or write, local paths and gs://bucket/key alike.

TensorFlow-free. The package's public API is re-exported here, so callers write
`storage.pull_tree(...)`; each module owns one concern:

- uris.py: the rules for URIs and object names (normalise, check, join, split), no requests.
- errors.py: StorageError, and its Unusable and Conflict, which retrying cannot help.
- gcs.py: the google-cloud-storage client of one call, its retries, transfer threads and errors.
- files.py: local files written whole (temporary name, then rename or hard link), listed, pruned.
- mirror.py: whole trees pulled into a local folder and published from one; URI checks.
- owned.py: the ownership rule: the prefixes (WRITTEN.json) and the cache (its marker) the job
  deletes in, each proved its own first.
- objects.py: one object read, written or deleted whole, on a condition (generation or content).
- listing.py: a data tree's fingerprint; diskspace.py: the free-space check before large writes.
"""
from storage.errors import Conflict, StorageError, Unusable
from storage.gcs import DEFAULT_MAX_WORKERS, DEFAULT_RETRY_DEADLINE_S
from storage.mirror import (
    TransferStats,
    check_writable,
    exists,
    fetch_file,
    fetch_tree,
    list_objects,
    publish_tree,
    pull_tree,
)
from storage.owned import (
    CACHE_MARKER,
    claim_cache,
    claim_owned,
    clear_owned,
    pull_owned,
    sync_owned,
)
from storage.uris import (
    GCS_SCHEME,
    is_remote,
    join,
    local_dir_for,
    name_problem,
    normalise_uri,
    overlaps,
)

__all__ = [
    "CACHE_MARKER", "DEFAULT_MAX_WORKERS", "DEFAULT_RETRY_DEADLINE_S", "GCS_SCHEME", "Conflict",
    "StorageError", "TransferStats", "Unusable", "check_writable", "claim_cache", "claim_owned",
    "clear_owned", "exists", "fetch_file", "fetch_tree", "is_remote", "join", "list_objects",
    "local_dir_for", "name_problem", "normalise_uri", "overlaps", "publish_tree", "pull_tree",
    "pull_owned", "sync_owned",
]
