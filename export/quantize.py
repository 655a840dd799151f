"""Quantize: static int8 quantization (QDQ, per-channel weights) calibrated on training images.

quant_pre_process (shape inference and graph optimisation) runs first, then quantize_static with
MinMax calibration over images of the run's training split, decoded exactly as in training.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from export.convert import INPUT_NAME
from export.errors import ExportError

log = logging.getLogger("export")


class ImageReader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader over image files, in small batches."""

    def __init__(self, paths: list[str], image_size: int, batch_size: int = 16):
        self.paths, self.image_size, self.batch_size = list(paths), image_size, batch_size
        self.position = 0

    def get_next(self) -> dict | None:
        from job.images import load_image

        if self.position >= len(self.paths):
            return None
        chunk = self.paths[self.position:self.position + self.batch_size]
        self.position += len(chunk)
        batch = np.stack([load_image(path, self.image_size) for path in chunk]).astype(np.float32)
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(float_model: Path, int8_model: Path, calibration_paths: list[str],
                  image_size: int) -> None:
    """Writes int8_model: QDQ, int8 activations and per-channel int8 weights, MinMax-calibrated."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_paths:
        raise ExportError("no training images to calibrate the int8 model on")
    reader = ImageReader(calibration_paths, image_size)
    with tempfile.TemporaryDirectory(prefix="quant-") as scratch:
        prepared = Path(scratch, "prepared.onnx")
        try:
            quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        except Exception as error:  # optional step: quantization works without it
            log.warning("quant_pre_process failed (%s); quantizing the graph as converted", error)
            prepared = float_model
        try:
            quantize_static(
                str(prepared), str(int8_model), reader,
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax)
        except Exception as error:
            raise ExportError(f"int8 quantization failed: {error.__class__.__name__}: "
                              f"{str(error).splitlines()[0][:300]}") from None
    log.info("int8 model calibrated on %d training images", len(calibration_paths))
