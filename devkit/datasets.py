"""Slices of a real data set for the benchmarks and tests: symlinks into it, nothing copied."""
from __future__ import annotations

from pathlib import Path


def link_slice(source: Path, target: Path, per_class: dict[str, int]) -> Path:
    """Symlinks the first N images of each class of each named split of source into target.

    per_class maps a split folder (train, validation, test) to N; links already there are kept,
    so a slice can be made again in the same place. Links are absolute, so a relative source
    works from any folder.
    """
    for split, count in per_class.items():
        for class_dir in sorted(p for p in (Path(source).resolve() / split).iterdir() if p.is_dir()):
            destination = Path(target) / split / class_dir.name
            destination.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:count]:
                link = destination / image.name
                if not link.exists():
                    link.symlink_to(image)
    return Path(target)
