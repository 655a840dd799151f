"""Errors: what storage calls raise, each with a one-line message naming the URI and the cause.

The job's entrypoint exits 2 on Unusable (and its Conflict: retrying cannot help) and 1 on any
other StorageError (a retry may help).
"""
from __future__ import annotations


class StorageError(Exception):
    """A URI could not be read or written; the message names the URI and the cause."""


class Unusable(StorageError):
    """A URI that cannot be used as it is set: missing, of the wrong kind, not writable, or
    holding what the job did not write. Retrying cannot help."""


class Conflict(Unusable):
    """Another writer changed what this one was about to write (a complete run, an object since
    it was listed): nothing of its is overwritten. Retrying cannot help."""
