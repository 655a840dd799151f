"""Versions: the production model's files under PROMOTE_URI, and the CURRENT.json that names one.

    PROMOTE_URI/versions/<RUN_ID>/   one promoted (or about to be) run: its SavedModel, labels,
                                     metrics, report, test predictions, and with EXPORT_ONNX=1 the
                                     ONNX files that passed their gates, export_report.json and the
                                     export's selftest/ folder; MANIFEST.json (size and SHA-256 of
                                     each file) written last, so a version without it is incomplete
    PROMOTE_URI/CURRENT.json         the version in production: its run_id, version_uri, data URI,
                                     classes, image size, decision threshold, headline test
                                     metrics, every file's SHA-256, and the history of the pointers
                                     before it (newest first)

A version is written completely before CURRENT.json is switched to it (job/promotion/pointer.py: atomic,
conditioned on the pointer compared against). Nothing here deletes a version. `python -m
job.promotion.versions rollback PROMOTE_URI` points CURRENT.json back at the previous entry of its history.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
from pathlib import Path

import storage
from common import run_files
from common.cache_dir import DEFAULT_CACHE_DIR
from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from job.promotion import pointer

log = logging.getLogger("job")

CURRENT = "CURRENT.json"
VERSIONS = "versions"
RUN_FILES = (run_files.SAVED_MODEL, run_files.LABELS, run_files.METRICS, run_files.RUN_PAGE,
             run_files.PREDICTIONS)
SELFTEST = "selftest"  # the export's self-test set, copied whole when present


class ChampionUnusable(Exception):
    """CURRENT.json, or the version it names, cannot be read or fails its checksums."""


def current_uri(promote_uri: str) -> str:
    return storage.join(promote_uri, CURRENT)


def version_uri(promote_uri: str, run_id: str) -> str:
    return storage.join(promote_uri, version_path(run_id))


def version_path(run_id: str) -> str:
    """A version's place under PROMOTE_URI, as CURRENT.json's "version" names it."""
    return f"{VERSIONS}/{run_id}"


def read_current(promote_uri: str, deadline: float) -> tuple[dict | None, str]:
    """(CURRENT.json as a dict, or None before the first promotion; its version token). A
    pointer that is not a JSON object naming a version raises ChampionUnusable."""
    data, token = pointer.read(current_uri(promote_uri), retry_deadline=deadline)
    if data is None:
        return None, token
    try:
        current = json.loads(data)
        if not isinstance(current, dict) or not current.get("version") \
                or not isinstance(current.get("files"), dict):
            raise ValueError("not a pointer to a version")
    except ValueError as error:
        raise ChampionUnusable(f"{current_uri(promote_uri)} is unreadable ({error})") from None
    return current, token


def fetch_verified(current: dict, promote_uri: str, cache_dir: Path, deadline: float) -> Path:
    """The local folder of the version a pointer names, each file checked against the SHA-256
    the pointer recorded; ChampionUnusable naming the first file missing or altered. The
    version is found by its path under PROMOTE_URI, so a copied PROMOTE_URI stays whole."""
    uri = storage.join(promote_uri, current.get("version") or "")
    try:
        local = Path(uri) if not storage.is_remote(uri) else storage.fetch_tree(
            uri, cache_dir / "promotion" / "versions", retry_deadline=deadline)
    except storage.Unusable as error:
        raise ChampionUnusable(f"version {uri}: {error}") from None
    for name, entry in sorted(current["files"].items()):
        path = local / name
        if not path.is_file():
            raise ChampionUnusable(f"version {uri}: {name} is missing")
        if run_files.sha256(path) != entry.get("sha256"):
            raise ChampionUnusable(f"version {uri}: {name} fails its SHA-256 in CURRENT.json")
    return local


def stage(staging: Path, run_dir: Path, export_dir: Path | None, export_files: list[str],
          replaced: dict[str, Path] | None = None) -> Path:
    """The version's files in staging, MANIFEST.json last: the run's (those named in replaced
    taken from the path given there instead), and the export's passed models (export_files), its
    report and its self-test folder."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in RUN_FILES:
        _copy((replaced or {}).get(name, run_dir / name), staging / name)
    if export_dir is not None:
        for name in [*export_files, run_files.EXPORT_REPORT, SELFTEST]:
            _copy(export_dir / name, staging / name)
    run_files.write_manifest(staging)
    return staging


def publish(staging: Path, uri: str, deadline: float) -> None:
    """The staged version to uri, MANIFEST.json last; a version this run already completed there
    (a rerun after SIGTERM) is left as it is."""
    if storage.exists(storage.join(uri, run_files.MANIFEST), retry_deadline=deadline):
        log.info("promotion: version %s is already complete", uri)
        return
    storage.publish_tree(staging, uri, last=run_files.MANIFEST, retry_deadline=deadline)


def pointer_to(version_dir: Path, uri: str, history: list[dict], **notes) -> dict:
    """CURRENT.json's content naming the version in version_dir (published at uri)."""
    metrics = json.loads((version_dir / run_files.METRICS).read_text())
    manifest = json.loads((version_dir / run_files.MANIFEST).read_text())
    test = metrics.get("test") or {}
    record = metrics.get("record") or {}
    return {"run_id": metrics.get("run_id"), "version": version_path(metrics.get("run_id")),
            "version_uri": uri, "switched_utc": utc_now(),
            "data_uri": record.get("data_uri"), "classes": metrics.get("classes"),
            "image_size": record.get("image_size"), "backbone": record.get("backbone"),
            "decision_threshold": metrics.get("decision_threshold", 0.5),
            "metrics": {"test_accuracy": test.get("accuracy"),
                        "test_macro_recall": test.get("macro_recall")},
            "files": {**manifest["files"], run_files.MANIFEST: {
                "bytes": (version_dir / run_files.MANIFEST).stat().st_size,
                "sha256": run_files.sha256(version_dir / run_files.MANIFEST)}},
            **notes, "history": history}


def history_entry(current: dict) -> dict:
    """A pointer as kept in its successor's history: everything but its own history."""
    return {key: value for key, value in current.items() if key != "history"}


def rollback(promote_uri: str, cache_dir: Path, deadline: float) -> dict:
    """Points CURRENT.json at the previous pointer of its history, once that version's files pass
    their checksums; the version rolled back from stays in versions/. Returns the new pointer."""
    current, token = read_current(promote_uri, deadline)
    if not current or not current.get("history"):
        raise ChampionUnusable(f"{current_uri(promote_uri)}: no earlier pointer to roll back to")
    previous, *older = current["history"]
    local = fetch_verified(previous, promote_uri, cache_dir, deadline)
    restored = {**pointer_to(local, storage.join(promote_uri, previous["version"]), older),
                "rolled_back_from": {"run_id": current.get("run_id"), "at_utc": utc_now()}}
    if not pointer.replace(current_uri(promote_uri), json_bytes(restored), token,
                           retry_deadline=deadline):
        raise ChampionUnusable(f"{current_uri(promote_uri)} changed during the rollback; run it "
                               "again")
    return restored


def json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    elif source.is_file():
        shutil.copy2(source, target)


def main(argv: list[str] | None = None) -> int:
    """`python -m job.promotion.versions rollback PROMOTE_URI [--cache-dir DIR]`: exit 0 rolled back,
    2 nothing to roll back to or the previous version fails its checksums, 1 storage failure."""
    parser = argparse.ArgumentParser(prog="python -m job.promotion.versions")
    parser.add_argument("command", choices=["rollback"])
    parser.add_argument("promote_uri")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        restored = rollback(storage.normalise_uri(args.promote_uri), args.cache_dir,
                            storage.DEFAULT_RETRY_DEADLINE_S)
    except ChampionUnusable as error:
        log.error("rollback refused: %s", error)
        return EXIT_BAD_INPUT
    except storage.StorageError as error:
        log.error("rollback failed: %s", error)
        return EXIT_FAILED
    log.info("rolled back: CURRENT.json names %s (%s) again", restored["run_id"],
             restored["version_uri"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
