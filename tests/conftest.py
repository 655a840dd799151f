"""Shared fixtures: paths to the real data in ../shared, temporary data trees, and servers on loopback."""


# --- Export (issue 4): small real-data runs and their ONNX exports, shared by the session. ---
import json as _json
import os as _os
import subprocess as _subprocess
import sys as _sys
from pathlib import Path as _Path

import pytest as _pytest

_REPO = _Path(__file__).resolve().parents[1]
_SHARED = _Path(__file__).resolve().parents[2] / "shared"
_XRAY_224 = _SHARED / "data" / "chest_xray_pneumonia_224"
_MOBILENET_WEIGHTS = (_SHARED / "weights"
                      / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5")
_SUBSET = {"train": 40, "validation": 10, "test": 20}  # images per class
_EXPORT_ENV = {"CALIBRATION_IMAGES": "40", "PARITY_IMAGES": "200", "LATENCY_RUNS": "5"}


def run_module(module: str, env: dict, timeout: int = 600) -> _subprocess.CompletedProcess:
    """`python -m module` in a fresh interpreter at the repository root, with env added."""
    environ = {**_os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(_REPO), **env}
    return _subprocess.run([_sys.executable, "-m", module], cwd=_REPO, env=environ,
                           capture_output=True, text=True, timeout=timeout)


@_pytest.fixture(scope="session")
def xray_subset(tmp_path_factory) -> _Path:
    """A small train/validation/test tree of real chest X-rays (symlinks into ../shared)."""
    if not _XRAY_224.is_dir():
        _pytest.skip(f"real data not found at {_XRAY_224} (../shared is absent)")
    root = tmp_path_factory.mktemp("xray-subset")
    for split, count in _SUBSET.items():
        for class_dir in sorted(p for p in (_XRAY_224 / split).iterdir() if p.is_dir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / image.name).symlink_to(image)
    return root


def _train(tmp_path_factory, data: _Path, name: str, **env) -> _Path:
    out = tmp_path_factory.mktemp(f"run-{name}")
    result = run_module("job", {"DATA_URI": str(data), "OUTPUT_URI": str(out), "RUN_ID": name,
                                "CACHE_DIR": str(out / "cache"), "BATCH_SIZE": "16", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return out / name


def _export(run_dir: _Path, **env) -> tuple[int, dict, str]:
    result = run_module("export", {"RUN_URI": str(run_dir), "CACHE_DIR": str(run_dir.parent / "cache"),
                                   **_EXPORT_ENV, **env})
    report_path = _Path(env.get("EXPORT_URI", run_dir)) / "export_report.json"
    report = _json.loads(report_path.read_text()) if report_path.exists() else {}
    return result.returncode, report, result.stderr


@_pytest.fixture(scope="session")
def vgg16_exported_by_job(tmp_path_factory, xray_subset) -> _Path:
    """VGG16 (random weights, 32 px) trained by `python -m job` with EXPORT_ONNX=1."""
    return _train(tmp_path_factory, xray_subset, "vgg16", BACKBONE="vgg16", WEIGHTS="none",
                  IMAGE_SIZE="32", HEAD_EPOCHS="1", FINE_TUNE_EPOCHS="1", EXPORT_ONNX="1",
                  **_EXPORT_ENV)


@_pytest.fixture(scope="session")
def mobilenet_run(tmp_path_factory, xray_subset) -> _Path:
    """MobileNetV2 alpha 0.5 with the real ImageNet weights, fine-tuned briefly at 96 px."""
    if not _MOBILENET_WEIGHTS.is_file():
        _pytest.skip(f"MobileNetV2 weights not found at {_MOBILENET_WEIGHTS}")
    return _train(tmp_path_factory, xray_subset, "mobilenet", BACKBONE="mobilenet_v2", ALPHA="0.5",
                  WEIGHTS=str(_MOBILENET_WEIGHTS), IMAGE_SIZE="96", HEAD_EPOCHS="2",
                  FINE_TUNE_EPOCHS="1", BATCH_SIZE="32")


@_pytest.fixture(scope="session")
def mobilenet_export(mobilenet_run) -> tuple[int, dict, str]:
    """(exit code, export_report.json, stderr) of `python -m export` on mobilenet_run."""
    return _export(mobilenet_run)


@_pytest.fixture(scope="session")
def mixed_precision_run(tmp_path_factory, xray_subset) -> _Path:
    """VGG16 at 32 px trained under mixed_float16 (forced on the CPU)."""
    return _train(tmp_path_factory, xray_subset, "fp16", BACKBONE="vgg16", WEIGHTS="none",
                  IMAGE_SIZE="32", HEAD_EPOCHS="1", FINE_TUNE_EPOCHS="1", MIXED_PRECISION="float16")
