"""Disk space: the check before each large local write, and the one line a full disk ends with.

A disk that fills during a write ends badly: h5py crashes the process (exit 139) when a weights
file cannot be written, TensorFlow raises ResourceExhaustedError with a traceback. So a write
whose size can be estimated first checks the free space of its volume (`require`), before a byte
is written; and a full disk that still happens (an estimate short, another process filling the
volume) is recognised in whatever error reports it (`from_error`), so that the entrypoints end
with one line naming the path, the space needed where it is known, and the space free.

Retrying cannot help (exit 2): the run's writes are the same on every attempt, and what it already
wrote (pulled data, caches, checkpoints) stays for the next to resume from, so a retry onto the
same volume, or onto a fresh one of the same size, fills it at the same point. A person frees
space or gives CACHE_DIR (or the local OUTPUT_URI) a larger volume, or lowers CACHE_BUDGET.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How the C++ of TensorFlow (and HDF5) reports them: strerror's text, the path before it.
_FULL_TEXTS = re.compile(r"No space left on device|Disk quota exceeded")
_PATH_BEFORE_TEXT = re.compile(r"(/[^\s;,'\"]+)[;,:]?\s*(?:" + _FULL_TEXTS.pattern + ")")
# What a file of weights takes beyond the bytes of its tensors (HDF5 keeps a header and a few
# attributes per variable: 0.9 KB each measured on MobileNetV2's 580 variables and optimizer
# slots); what a SavedModel's graph takes per variable (3.3 MB for MobileNetV2's 262).
WEIGHTS_FILE_BYTES_PER_VARIABLE = 4 * 1024
GRAPH_BYTES_PER_VARIABLE = 16 * 1024
SLACK_BYTES = 1 << 20


class DiskFull(Exception):
    """A volume has, or had, less free space than a write needed."""

    def __init__(self, path: Path | str, free: int, needed: int | None = None, what: str = ""):
        self.path, self.free, self.needed, self.what = str(path), free, needed, what
        writing = f" for {what}" if what else ""
        needs = (f"needs about {size_text(needed)}{writing}, {size_text(free)} free"
                 if needed is not None else f"no space left{writing} ({size_text(free)} free now)")
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}disk full: {needs}; free space on that volume or give it more "
                         "(CACHE_DIR, a local OUTPUT_URI), or lower CACHE_BUDGET")


def free_bytes(path: Path | str) -> int:
    """The free space of the volume path is (or would be) on, for this user."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require(path: Path | str, needed: int, what: str) -> None:
    """Raises DiskFull, before anything is written, when path's volume has less than needed
    bytes (plus SLACK_BYTES) free."""
    free = free_bytes(path)
    if needed + SLACK_BYTES > free:
        raise DiskFull(path, free, needed + SLACK_BYTES, what)


@contextlib.contextmanager
def writing(path: Path | str, needed: int, what: str) -> Iterator[None]:
    """require, then the write inside: a full disk that still happens during it (see module
    docstring) becomes DiskFull naming path and the estimate."""
    require(path, needed, what)
    try:
        yield
    except Exception as error:
        full = from_error(error)
        if full is None:
            raise
        raise DiskFull(full.path, full.free, needed + SLACK_BYTES, what) from None


def from_error(error: BaseException, where: Path | str = "") -> DiskFull | None:
    """The DiskFull an error (or an error it was raised from) reports: an OSError with ENOSPC or
    EDQUOT, or TensorFlow's error whose text says so; None for any other error. where: the path
    to name when the error names none (a zip file's write error does not)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull):
            return error
        path = _full_path(error)
        if path is not None:
            path = path or str(where)
            return DiskFull(path, free_bytes(path) if path else 0)
        error = error.__cause__ or error.__context__
    return None


def _full_path(error: BaseException) -> str | None:
    """The path a full-disk error names ("" when it names none), or None if it is no such error."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return os.fsdecode(error.filename) if error.filename else ""
    text = str(error)
    if not _FULL_TEXTS.search(text):
        return None
    found = _PATH_BEFORE_TEXT.search(text)  # without the suffix of TensorFlow's temporary file
    return re.sub(r"\.tempstate\d+$", "", found.group(1)) if found else ""


def tensors_bytes(variables: Iterable) -> int:
    """The bytes of the values of variables (anything with .shape and .dtype)."""
    import numpy as np

    return sum(int(np.prod(variable.shape)) * np.dtype(str(variable.dtype)).itemsize
               for variable in variables)


def weights_file_bytes(model) -> int:
    """About the size of the .weights.h5 file Keras' save_weights writes: the model's variables
    and its optimizer's, if it has one, with HDF5's overhead for each."""
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights) + (list(optimizer.variables) if optimizer is not None else [])
    return tensors_bytes(variables) + WEIGHTS_FILE_BYTES_PER_VARIABLE * len(variables)


def model_files_bytes(model) -> int:
    """About what a run's model files take: saved_model/ (the weights, and the graph, which
    grows with the variables) and model.keras (a weights file, optimizer included)."""
    saved_model = tensors_bytes(model.weights) + GRAPH_BYTES_PER_VARIABLE * len(model.weights)
    return saved_model + weights_file_bytes(model)


def size_text(size: int) -> str:
    """A size in the largest decimal unit it reaches: "512 B", "9.22 MB", "33.20 GB"."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
