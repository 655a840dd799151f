"""Run files: the names of a run directory's files, how they are written, and MANIFEST.json.

The job writes a run, promotion amends and copies it, the export reads it: all three name its
files from here. A file is written whole (through a temporary file and a rename, so a reader never
sees half of it); MANIFEST.json, written last by `write_manifest`, lists every file with its size
and SHA-256 and is what marks a run as complete. The run's fingerprint, a digest of that list, is
which run an export is of.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST = "MANIFEST.json"
METRICS = "metrics.json"
LABELS = "labels.txt"
SAVED_MODEL = "saved_model"  # the folder of the run's SavedModel, as deployed for serving
KERAS_MODEL = "model.keras"
RUN_PAGE = "report.html"  # the run's self-contained page (job/results/run_page.py)
PREDICTIONS = "test_predictions.json"  # what the page's test-set sections are drawn from
PROMOTION = "promotion.json"  # the promotion's verdict (job/promotion/promote.py)
EXPORT_REPORT = "export_report.json"  # the export's, written last beside its files (export/target.py)

# The files of a complete run that promotion amends after it is published (job/promotion/promote.py):
# its verdict, and report.html with its Promotion section, each with its MANIFEST.json entry. A
# run's fingerprint leaves them out, so an export made before the promotion stays the run's own.
AMENDED_BY_PROMOTION = (PROMOTION, RUN_PAGE)

# Names of files being written: write_text's "x.tmp", TensorFlow's atomic writes
# ("saved_model.pb.tmp" and a hex id), the storage module's "x.partial".
TEMPORARY = re.compile(r"\.(tmp[0-9a-f]*|partial)$")


def write_json(path: Path, data: dict) -> None:
    """Writes JSON whole (see write_text)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Writes through a temporary file and a rename, so a reader never sees half a file."""
    temporary = Path(f"{path}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_manifest(run_dir: Path) -> dict:
    """Lists every file of the run with its size and SHA-256; written last, it marks completion.

    Never a temporary or partial file (see TEMPORARY): each attempt writes into an empty folder,
    so there should be none, but a writer killed mid-file must never have its half listed."""
    files = {}
    for path in sorted(p for p in Path(run_dir).rglob("*") if p.is_file() and p.name != MANIFEST):
        relative = str(path.relative_to(run_dir))
        if relative.startswith("checkpoints/") or TEMPORARY.search(path.name):
            continue
        files[relative] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"files": files}
    write_json(Path(run_dir, MANIFEST), manifest)
    return manifest


def run_fingerprint(manifest: dict) -> str:
    """SHA-256 of what a run's MANIFEST.json lists (names, sizes, checksums), less the files
    promotion amends: which run this is, to the export that records it."""
    files = {name: entry for name, entry in manifest["files"].items()
             if name not in AMENDED_BY_PROMOTION}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
