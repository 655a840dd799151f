"""Budget: how much scratch disk a run's caches will fill, and which of them fit CACHE_BUDGET.

The caches of a run (job.inputs.features) are the decoded training, validation and test images, the
pooled features phase 1 fits on and, for cached fine-tuning, the outputs of the frozen bottom
for every view of every image, the largest by far: about 166 KB a view for VGG16 at 150 px
(block4_pool, 9x9x512 float32), so 100,000 images at two views need 33 GB. Their sizes follow
from the data set's counts and the models' output shapes alone, so they are known before a byte
is written. A phase whose cache would not fit trains online instead (its frozen layers run every
epoch, augmentation drawn afresh), which gives the same kind of model at more compute and no disk.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from storage.diskspace import size_text

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclasses.dataclass(frozen=True)
class CacheBudget:
    """CACHE_BUDGET: a fixed number of bytes, or else a share of the scratch volume's free space."""

    share: float = 0.8
    fixed_bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> "CacheBudget":
        """"80%" (of the free space), "0" (no cache), "500MB", "20GiB" or plain bytes; raises
        ValueError for anything else."""
        text = text.strip().lower().replace(" ", "")
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 <= share <= 1:
                raise ValueError(text)
            return cls(share=share)
        number = text.rstrip("kmgtib")
        unit = text[len(number):]
        if unit not in UNITS or float(number) < 0:
            raise ValueError(text)
        return cls(fixed_bytes=int(float(number) * UNITS[unit]))

    def describe(self) -> str:
        return (f"{size_text(self.fixed_bytes)}" if self.fixed_bytes is not None
                else f"{self.share:.0%} of the scratch volume's free space")


def available_bytes(budget: CacheBudget, scratch_dir: Path) -> int:
    """What the caches may fill under scratch_dir: the fixed budget, or the share of the volume's
    free space counting what the run's own scratch already holds (a resumed run's caches, which
    it reuses), so that a restart decides as its first attempt did."""
    if budget.fixed_bytes is not None:
        return budget.fixed_bytes
    return int(budget.share * (shutil.disk_usage(scratch_dir).free + held_bytes(scratch_dir)))


def held_bytes(scratch_dir: Path) -> int:
    """What the files under scratch_dir take (a resumed run's caches)."""
    return sum(path.stat().st_size for path in Path(scratch_dir).rglob("*") if path.is_file())


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """The estimated size of each cache and whether each phase trains on its frozen layers'
    cached outputs, recorded in metrics.json as "cache"."""

    budget: str
    available_bytes: int
    decoded_images_bytes: int
    phase_bytes: dict[str, int]  # the frozen layers' outputs a phase would cache
    cached: dict[str, bool]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def refusals(self) -> list[str]:
        """One line per phase that wanted its cache and will train online, saying why."""
        return [f"{phase}: its cache of the frozen layers' outputs would take "
                f"{size_text(self.phase_bytes[phase])} on top of "
                f"{size_text(self.decoded_images_bytes)} of decoded images, over CACHE_BUDGET "
                f"({self.budget}: {size_text(self.available_bytes)}); it trains online, its frozen "
                "layers running every epoch"
                for phase, cached in self.cached.items() if not cached]


def plan(budget: str, available: int, decoded_images_bytes: int,
         wanted: dict[str, int]) -> CachePlan:
    """Caches each phase in wanted (phase -> bytes of its frozen layers' outputs, counting the
    outputs it computes its own from) whose cache fits beside the decoded images."""
    fits = {phase: decoded_images_bytes + size <= available for phase, size in wanted.items()}
    return CachePlan(budget, available, decoded_images_bytes, dict(wanted), fits)


def tensor_bytes(shape: tuple, dtype: str, count: int) -> int:
    """Bytes of count tensors of one example's shape (without the batch axis)."""
    return int(np.prod(shape)) * np.dtype(dtype).itemsize * count
