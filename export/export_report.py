"""Export report: export_report.json, assembled from the export's figures by one pure function."""
from __future__ import annotations

from common.record import RunRecord
from export.config import ExportConfig
from export.formats import FORMATS, Verdict


def build_report(config: ExportConfig, record: RunRecord, verdict: Verdict, *,
                 opsets: dict[str, int], files: dict[str, dict], run_sizes: dict[str, int],
                 latency: dict, latency_settings: dict, operators: dict[str, dict],
                 quantization: dict | None, run_fingerprint: str,
                 seconds: dict[str, float], versions: dict[str, str], created_utc: str) -> dict:
    """export_report.json. files: bytes and sha256 of every model built, of which it lists the
    passed ones (the others are not published); sizes_bytes has them all, with the run's own."""
    return {
        "status": "failed" if verdict.failures else "passed",
        "failed_gates": verdict.failures,
        "run_id": record.run_id,
        "run_uri": config.run_uri,
        # The run's MANIFEST.json: which run this export is of (export.target), wherever it lies.
        "run_fingerprint": run_fingerprint,
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
        "fastest": fastest(latency, verdict.passed),
        # Per model file: the compute operators onnxruntime runs, int8 and float32, and the share
        # of multiply-accumulates in int8 (export.int8.census), so a slow int8 model explains itself.
        "operators": operators,
        "quantization": quantization,
        "files": {row.file: files[row.file] for row in FORMATS if verdict.passed.get(row.key)},
        "seconds": seconds,
        "versions": versions,
    }


def fastest(latency: dict, passed: dict[str, bool]) -> dict:
    """Per batch size, the passed model file onnxruntime (the predictor's default) runs fastest
    on this CPU, and its speed: int8 is not always the faster one (a `mixed_16bit` file is a third
    of float32's size but slower), so the report says which to ship where speed matters."""
    timed = {row.file: latency[row.backend] for row in FORMATS
             if passed.get(row.key) and row.backend in latency}
    if not timed:
        return {}
    batch1 = min(timed, key=lambda file: timed[file]["batch1_p50_ms"])
    batch32 = max(timed, key=lambda file: timed[file]["batch32_images_per_s"])
    return {"batch1": {"file": batch1, "p50_ms": timed[batch1]["batch1_p50_ms"]},
            "batch32": {"file": batch32,
                        "images_per_s": timed[batch32]["batch32_images_per_s"]}}
