"""Target: the folder an export publishes into, whose it is, and how a new export replaces one.

An export writes only into a folder that holds no run, or the exported run itself (its
MANIFEST.json, byte for byte: the run directory, the default target, or a copy of it), and only
beside exports of that same run (their report's `run_fingerprint`: common.run_files); anything else is refused
with BadInput naming the file, before any work. In the run's own folder it never writes a name
MANIFEST.json lists.

A previous export is replaced only by one that passed: its report is deleted first (so no reader
takes the old report for a description of the files being replaced), then the files are written,
the previous export's files this one does not write are deleted (each only while it holds the
bytes its report listed), and the new report is created last, exclusively. A failed export
beside a previous one changes nothing of it: its report goes to FAILED_REPORT. A failed export
into a folder with no export publishes as before: the models that passed and a failed report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from export.errors import BadInput, ExportError
from common.run_files import EXPORT_REPORT, MANIFEST, METRICS
from storage import join, objects

log = logging.getLogger("export")

FAILED_REPORT = "export_report.failed.json"  # a failed attempt's, beside an export it left alone
PAGE = "export_report.html"  # the run's report.html with the export's section filled in


@dataclasses.dataclass(frozen=True)
class Run:
    """Who an export belongs to: the run's fingerprint (common.run_files.run_fingerprint), id and URI."""

    fingerprint: str
    run_id: str
    run_uri: str

    def made(self, report: dict) -> bool:
        """Whether an export report is of this run. Reports from before `run_fingerprint`
        are judged by run id and URI."""
        if "run_fingerprint" in report:
            return report["run_fingerprint"] == self.fingerprint
        return (report.get("run_id"), report.get("run_uri")) == (self.run_id, self.run_uri)


@dataclasses.dataclass(frozen=True)
class Target:
    uri: str
    run_files: frozenset[str]  # what MANIFEST.json lists, where uri holds the run itself
    report: dict | None  # the previous export's report, and its SHA-256
    report_sha256: str | None
    failed_report_sha256: str | None


def inspect(uri: str, setting: str, run_dir: Path, run: Run) -> Target:
    """What uri holds, checked to be the run's or nobody's; BadInput naming the setting and the
    file otherwise."""
    manifest = (run_dir / MANIFEST).read_bytes()
    theirs = objects.read(join(uri, MANIFEST))
    metrics = objects.read(join(uri, METRICS)) if theirs != manifest else None
    if theirs is not None and theirs != manifest:
        raise BadInput(f"{setting}={uri}: holds {MANIFEST} of another run{_run_named(metrics)}; "
                       "an export never writes into another run's directory")
    if metrics is not None:
        raise BadInput(f"{setting}={uri}: holds {METRICS}{_run_named(metrics)} and no {MANIFEST} "
                       "(a run not complete); an export never writes into another run's directory")
    report, report_sha256 = _export_of(uri, EXPORT_REPORT, setting, run)
    _, failed_report_sha256 = _export_of(uri, FAILED_REPORT, setting, run)
    run_files = frozenset(json.loads(manifest)["files"]) if theirs is not None else frozenset()
    return Target(uri, run_files, report, report_sha256, failed_report_sha256)


def publish(staging: Path, names: list[str], target: Target, passed: bool) -> str:
    """Publishes the staged names (EXPORT_REPORT among them) to the target as the module docstring
    says; returns the name the report went under."""
    if not passed and target.report is not None:
        objects.put(staging / EXPORT_REPORT, join(target.uri, FAILED_REPORT))
        log.warning("%s at %s left as it was (status %s): a failed export replaces none; this "
                    "attempt's report is %s", EXPORT_REPORT, target.uri, target.report.get("status"),
                    FAILED_REPORT)
        return FAILED_REPORT
    if target.report is not None and not objects.delete_if_unchanged(
            join(target.uri, EXPORT_REPORT), target.report_sha256):
        raise ExportError(f"{join(target.uri, EXPORT_REPORT)}: changed while this export ran (another "
                          "export of the run?); nothing replaced")
    written = [name for name in names if name != EXPORT_REPORT and name not in target.run_files]
    for name in written:
        objects.put(staging / name, join(target.uri, name))
    previous_files = (target.report or {}).get("files") or {}
    for name in sorted(set(previous_files) - set(written)):
        objects.delete_if_unchanged(join(target.uri, name), previous_files[name]["sha256"])
    try:
        objects.put(staging / EXPORT_REPORT, join(target.uri, EXPORT_REPORT), exclusive=True)
    except objects.Exists:
        raise ExportError(f"{join(target.uri, EXPORT_REPORT)}: another export of the run published "
                          "meanwhile; its files and this one's may be mixed: export again")
    if passed and target.failed_report_sha256:  # an earlier attempt's, superseded now
        objects.delete_if_unchanged(join(target.uri, FAILED_REPORT), target.failed_report_sha256)
    return EXPORT_REPORT


def _export_of(uri: str, name: str, setting: str, run: Run) -> tuple[dict | None, str | None]:
    """The export report `name` under uri and its SHA-256 ((None, None) where there is none);
    BadInput when it is not a report of this run's export."""
    content = objects.read(join(uri, name))
    if content is None:
        return None, None
    try:
        report = json.loads(content)
        ours = run.made(report)
    except (ValueError, AttributeError):
        raise BadInput(f"{setting}={uri}: {name} is not an export report; refusing to replace "
                       "it") from None
    if not ours:
        raise BadInput(f"{setting}={uri}: holds {name} of another run ({report.get('run_id')!r} "
                       f"at {report.get('run_uri')}); an export never replaces another run's")
    return report, hashlib.sha256(content).hexdigest()


def _run_named(metrics: bytes | None) -> str:
    """" (run 'id')" from a metrics.json's bytes, or "" where they name none."""
    try:
        run_id = json.loads(metrics or b"{}").get("run_id")
    except (ValueError, AttributeError):
        return ""
    return f" (run {run_id!r})" if run_id else ""
