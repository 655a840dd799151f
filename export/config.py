"""ExportConfig: the export's settings, declared once (common/settings.py), validated in one place.

Declared as the training job's are (job/config.py), with its parsers of URIs and local folders, so
every bad value fails with one line naming the variable and what it accepts (exit code 2) before
any work starts; `python -m export --help` and docs/settings.md come from the same declarations.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from common import settings
from common.cache_dir import DEFAULT_CACHE_DIR
from common.settings import setting
from edge.runtime import available_cores
from export import measure
from job.config import LOCAL_FOLDER, URI

MIN_OPSET, MAX_OPSET = 13, 18  # QDQ per-channel needs 13; tf2onnx 1.17 is tested up to 18
PROG = "python -m export"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Converts one finished training run to ONNX (float32, and static int8), proves parity
    against the run's own model and publishes the models with export_report.json."""

    run_uri: str = setting(
        "RUN_URI", URI, required="a run directory (local or gs://) that holds saved_model/, "
                                 "model.keras, metrics.json and MANIFEST.json",
        help="run directory, local or gs://")
    export_uri: str = setting(
        "EXPORT_URI", URI, "", shown="the run directory",
        help="where the models and the report go")
    opset: int = setting(
        "OPSET", settings.integer(MIN_OPSET, MAX_OPSET), 17,
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET}")
    int8: bool = setting(
        "INT8", settings.switch(), True, help="also write the static int8 model")
    calibration_images: int = setting(
        "CALIBRATION_IMAGES", settings.integer(1), 300,
        help="training images used to calibrate int8 (seeded sample)")
    parity_images: int = setting(
        "PARITY_IMAGES", settings.integer(1), 1000,
        help="test images compared (seeded sample of the run's test split; 1,000 is the whole "
             "test split of most runs, so one flipped label moves agreement by 0.1 point); they "
             "are held decoded, about 600 MB at 224 px")
    latency_runs: int = setting(
        "LATENCY_RUNS", settings.integer(1), 100,
        help="batch-1 timed calls per backend (batch-32 calls: a tenth)")
    threads: int = setting(
        "THREADS", settings.integer(0), 0, shown="0: every core this process may use",
        help="onnxruntime intra-op threads")
    data_uri: str = setting(
        "DATA_URI", URI, "", shown="the run's",
        help="where the run's data lives now, if it moved (unset: the DATA_URI the run recorded "
             "in metrics.json)")
    cache_dir: Path = setting(
        "CACHE_DIR", LOCAL_FOLDER, DEFAULT_CACHE_DIR, shown="~/.cache/image-classifier-job",
        help="scratch space, a local folder (a URI is refused)")
    int8_min_agreement: float = setting(
        "INT8_MIN_AGREEMENT", settings.fraction(), measure.INT8_MIN_AGREEMENT,
        help="the int8 gate: least top-1 agreement with the float32 reference on the parity "
             "images")
    int8_max_accuracy_drop: float = setting(
        "INT8_MAX_ACCURACY_DROP", settings.fraction(), measure.INT8_MAX_ACCURACY_DROP,
        help="the int8 gate: most the int8 test accuracy may differ from float32's (0.01: one "
             "point)")

    @property
    def target_uri(self) -> str:
        return self.export_uri or self.run_uri

    @property
    def intra_op_threads(self) -> int:
        return self.threads or available_cores()

    @classmethod
    def from_env(cls, environ: Mapping[str, str], argv: Sequence[str] = ()) -> "ExportConfig":
        """The settings the environment and the flags in argv give (a flag beats its variable);
        ConfigError, one line, for the first problem."""
        return settings.read(cls, environ, argv, PROG)
