"""Report: export_report.json, assembled from the export's figures by one pure function."""
from __future__ import annotations

from export.config import ExportConfig
from export.formats import FORMATS, Verdict
from job.record import RunRecord


def build_report(config: ExportConfig, record: RunRecord, verdict: Verdict, *,
                 opsets: dict[str, int], files: dict[str, dict], run_sizes: dict[str, int],
                 latency: dict, latency_settings: dict, operators: dict[str, dict],
                 quantization: dict | None,
                 seconds: dict[str, float], versions: dict[str, str], created_utc: str) -> dict:
    """export_report.json. files: bytes and sha256 of every model built, of which it lists the
    passed ones (the others are not published); sizes_bytes has them all, with the run's own."""
    return {
        "status": "failed" if verdict.failures else "passed",
        "failed_gates": verdict.failures,
        "run_id": record.run_id,
        "run_uri": config.run_uri,
        "export_uri": config.target_uri,
        "created_utc": created_utc,
        "opsets": opsets,
        "classes": record.classes,
        "image_size": record.image_size,
        "decision_threshold": record.decision_threshold,
        "training_precision_policy": record.precision_policy,
        "parity": verdict.parity,
        # Every format's thresholds, including those this export did not write.
        "gates": {row.key: row.limits(config) for row in FORMATS},
        "sizes_bytes": {**run_sizes, **{name: file["bytes"] for name, file in files.items()}},
        "latency": latency,
        "latency_settings": latency_settings,
        # Per model file: the compute operators onnxruntime runs, int8 and float32, and the share
        # of multiply-accumulates in int8 (export.census), so a slow int8 model explains itself.
        "operators": operators,
        "quantization": quantization,
        "files": {name: file for name, file in files.items() if verdict.passed[name]},
        "seconds": seconds,
        "versions": versions,
    }
