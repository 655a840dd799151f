"""ExportConfig: the export's settings, read from environment variables and validated in one place.

Reuses the training job's typed reader, so every bad value fails with one line naming the variable
and what it accepts (exit code 2) before any work starts.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from edge.runtime import available_cores
from export import measure
from job.config import ConfigError, EnvReader

MIN_OPSET, MAX_OPSET = 13, 18  # QDQ per-channel needs 13; tf2onnx 1.17 is tested up to 18


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    run_uri: str
    export_uri: str = ""  # empty: the run directory itself
    opset: int = 17
    int8: bool = True
    calibration_images: int = 300
    parity_images: int = 1000  # the whole test split of most runs: one flip is 0.1 %, not 0.5 %
    latency_runs: int = 100  # batch-1 timed runs per backend; batch-32 runs are a tenth of it
    threads: int = 0  # onnxruntime intra-op threads; 0: every core this process may use
    data_uri: str = ""  # empty: the DATA_URI the run recorded in metrics.json
    cache_dir: Path = Path.home() / ".cache" / "image-classifier-job"
    # The int8 gate: top-1 agreement with the float32 reference, and test accuracy at most this
    # far from float32's.
    int8_min_agreement: float = measure.INT8_MIN_AGREEMENT
    int8_max_accuracy_drop: float = measure.INT8_MAX_ACCURACY_DROP

    @property
    def target_uri(self) -> str:
        return self.export_uri or self.run_uri

    @property
    def intra_op_threads(self) -> int:
        return self.threads or available_cores()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "ExportConfig":
        env = EnvReader(environ)
        run_uri = env.uri("RUN_URI", "")
        if not run_uri:
            raise ConfigError("RUN_URI is required: set it to a run directory (local or gs://) "
                              "that holds saved_model/, model.keras, metrics.json and MANIFEST.json")
        opset = env.integer("OPSET", 17, minimum=MIN_OPSET)
        if opset > MAX_OPSET:
            raise ConfigError(f"OPSET={opset} is not valid: expected an integer from {MIN_OPSET} "
                              f"to {MAX_OPSET}")
        return cls(
            run_uri=run_uri,
            export_uri=env.uri("EXPORT_URI", ""),
            opset=opset,
            int8=env.flag("INT8", True),
            calibration_images=env.integer("CALIBRATION_IMAGES", 300, minimum=1),
            parity_images=env.integer("PARITY_IMAGES", 1000, minimum=1),
            latency_runs=env.integer("LATENCY_RUNS", 100, minimum=1),
            threads=env.integer("THREADS", 0, minimum=0),
            data_uri=env.uri("DATA_URI", ""),
            cache_dir=env.local_folder("CACHE_DIR", cls.cache_dir),
            int8_min_agreement=env.fraction("INT8_MIN_AGREEMENT", measure.INT8_MIN_AGREEMENT),
            int8_max_accuracy_drop=env.fraction("INT8_MAX_ACCURACY_DROP",
                                                measure.INT8_MAX_ACCURACY_DROP),
        )
