"""Files: which files under a folder there are to read, each real file once, and why the others not.

Symbolic links are followed, but a link to a folder is followed once: a link that loops back to
a folder above it, or that leads to a folder already walked, is skipped with its reason, and so
is a second path (a symbolic or hard link) to a file already listed. Without this a folder holding
`a -> .` and `b -> .` has 2^40 paths (the kernel stops resolving at 40 links), and a file reached
by two paths would be read, counted and predicted twice. The training job (job/inputs/data.py, which adds
its class-folder rules through `Finder.link_target_problem`) and the edge predictor both walk
folders with this code. It needs only the standard library.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

LINK_LOOP = "symbolic link loop: points to an ancestor folder"


class Finder:
    """Lists the files under folders, following symbolic links, each real file only once.

    Reasons for what it leaves out go into skipped, keyed by the path relative to root. The first
    path found is kept: real folders before links to them where they sit side by side.
    """

    def __init__(self, root: Path, skipped: dict[str, str]):
        self.root = root
        self.skipped = skipped
        self.folders: dict[Path, str] = {}  # real path of each folder listed -> path listed by
        self.files: dict[tuple[int, int], str] = {}  # (device, inode) of each file kept -> its path

    def walk(self, folder: Path) -> Iterator[Path]:
        """Every entry under folder that is not a folder, sorted, nested folders included
        (hidden ones left out, links that loop or lead to a folder already walked skipped)."""
        yield from self._walk(folder, real_path(folder), above=())

    def claim(self, path: Path, folder: Path) -> str | None:
        """Why the file at path, found by walking folder, is not used, or None: then it is, and
        a later path to the same file (a symbolic or hard link) is not."""
        status = path.stat()
        identity = (status.st_dev, status.st_ino)
        if identity in self.files:
            return f"same file as {self.files[identity]}"
        if path.is_symlink():
            problem = self.link_target_problem(real_path(path), real_path(folder), folder=False)
            if problem:
                return problem
        self.files[identity] = relative(path, self.root)
        return None

    def link_problem(self, link: Path, own: Path, above: tuple[Path, ...]) -> str | None:
        """Why the folder link, met while walking the folder whose real path is own below the
        real folders above, is not followed, or None."""
        target = real_path(link)
        if any(folder.is_relative_to(target) for folder in above):
            return LINK_LOOP
        return self.link_target_problem(target, own, folder=True)

    def link_target_problem(self, target: Path, own: Path, folder: bool) -> str | None:
        """Why a link met while walking own must not lead to target (a folder, or a file), or
        None. Anywhere is fine here; the training job narrows it to keep classes apart."""
        return None

    def _walk(self, folder: Path, own: Path, above: tuple[Path, ...]) -> Iterator[Path]:
        real = real_path(folder)
        if real in self.folders:
            self.skipped[relative(folder, self.root)] = f"same folder as {self.folders[real]}"
            return
        self.folders[real] = relative(folder, self.root)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except FileNotFoundError:
            return  # e.g. a class missing from a split folder
        except OSError as error:
            self.skipped[relative(folder, self.root)] = f"unreadable folder: {error.strerror}"
            return
        for entry in entries:
            if not entry.is_dir():
                yield Path(folder, entry.name)
        above = above + (real,)
        subfolders = [entry for entry in entries
                      if entry.is_dir() and not entry.name.startswith(".")]
        for entry in sorted(subfolders, key=lambda entry: entry.is_symlink()):  # real ones first
            path = Path(folder, entry.name)
            problem = self.link_problem(path, own, above) if entry.is_symlink() else None
            if problem:
                self.skipped[relative(path, self.root)] = problem
            else:
                yield from self._walk(path, own, above)


def file_problem(path: Path) -> str | None:
    """Why a listed file cannot be read, found without reading it, or None: hidden, a symbolic
    link to nothing, gone since the listing, or empty."""
    if path.name.startswith("."):
        return "hidden file"
    if not path.exists():
        return "broken symbolic link" if path.is_symlink() else "file vanished while listing"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def relative(path: Path, root: Path) -> str:
    """path relative to root, or the whole path where it is not under root."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def real_path(path: Path) -> Path:
    """The path with every symbolic link resolved, whether or not it exists."""
    return Path(os.path.realpath(path))
