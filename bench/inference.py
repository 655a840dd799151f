"""CPU inference speed: the SavedModel in TensorFlow against ONNX float32 and int8 in onnxruntime.

For VGG16 at 150 and MobileNetV2 (alpha 0.5, real ImageNet weights) at 224, trains a short run
on real chest X-rays with `python -m job`, exports it with `python -m export` (onnxruntime with
intra-op threads = cores and ORT_ENABLE_ALL), and prints JSON: p50/p95 latency at batch 1 and
images/s at batch 32 of each backend, measured in the same export run, and their ratios.
Latency does not depend on the weights, so VGG16 runs with WEIGHTS=none here. --models picks
some of them, --data another data set with train/validation/test folders, --image-size another
input size for every model (a quick look: the figures then say little about the real sizes),
--images-per-class how many images of each class the short run takes from each split (the
export's parity gate reads up to 1,000 of the test images: `--images-per-class 200,50,100000`
judges int8 on a whole test split). --run exports and times a finished run as it is (a real
model, on its own data's whole test split) instead of, or beside, the short runs. Where OpenVINO
is installed (requirements-openvino.txt), the export times it on the same files, and the JSON
gives its int8 model against onnxruntime's float32 and its agreement with the reference.

    python -m bench.inference [--latency-runs 100] [--models vgg16_150,mobilenet_v2_050_224|none]
        [--data DIR] [--image-size N] [--images-per-class 40,10,50] [--run RUN_DIR ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "chest_xray_pneumonia_224"
MOBILENET = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"

from devkit.datasets import link_slice  # noqa: E402

MODELS = {
    "vgg16_150": {"BACKBONE": "vgg16", "WEIGHTS": "none", "IMAGE_SIZE": "150"},
    "mobilenet_v2_050_224": {"BACKBONE": "mobilenet_v2", "ALPHA": "0.5", "WEIGHTS": str(MOBILENET),
                             "IMAGE_SIZE": "224"},
}


def run(module: str, env: dict) -> subprocess.CompletedProcess:
    """`python -m module` ("job" or "export") in a fresh process, env added to this one's."""
    return checked(subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env}))


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """result, unless it failed without figures (exit 1: a parity gate failed, timings measured)."""
    if result.returncode not in (0, 1):
        raise SystemExit(f"python -m {result.args[-1]} failed:\n{result.stderr[-3000:]}")
    return result


def measure(name: str, settings: dict, data: Path, work: Path, latency_runs: int) -> dict:
    """Trains, exports and times one model; the export report's latency, sizes and ratios."""
    run("job", {"DATA_URI": str(data), "OUTPUT_URI": str(work), "RUN_ID": name,
                "CACHE_DIR": str(work / "cache"), "HEAD_EPOCHS": "2", "FINE_TUNE_EPOCHS": "0",
                **settings})
    return {"settings": settings,
            **export_and_time(work / name, work, latency_runs, {"CALIBRATION_IMAGES": "80"})}


def export_and_time(run_dir: Path, work: Path, latency_runs: int, settings: dict) -> dict:
    """Exports the run into work and reads the report: latency, sizes, parity and their ratios,
    OpenVINO's beside onnxruntime's where it is installed."""
    target = work / f"export-{run_dir.name}"
    result = run("export", {"RUN_URI": str(run_dir), "EXPORT_URI": str(target),
                            "CACHE_DIR": str(work / "cache"), "LATENCY_RUNS": str(latency_runs),
                            **settings})
    if not (target / "export_report.json").is_file():  # exit 1 without a report: it failed early
        raise SystemExit(f"python -m export of {run_dir} failed (exit {result.returncode}) before "
                         f"it wrote export_report.json:\n{result.stderr[-3000:]}")
    report = json.loads((target / "export_report.json").read_text())
    latency, parity = report["latency"], report["parity"]

    def ratio(numerator: str, denominator: str) -> float | None:
        if numerator not in latency:
            return None
        return round(latency[numerator]["batch32_images_per_s"]
                     / latency[denominator]["batch32_images_per_s"], 2)

    return {
        "latency": latency,
        "sizes_bytes": report["sizes_bytes"],
        "onnx_float32_vs_tensorflow_batch32": ratio("onnx_float32", "tensorflow"),
        "onnx_int8_vs_float32_batch1_p50": round(
            latency["onnx_float32"]["batch1_p50_ms"] / latency["onnx_int8"]["batch1_p50_ms"], 2),
        "onnx_int8_vs_float32_batch32": ratio("onnx_int8", "onnx_float32"),
        # The "best runtime offered": each runtime's int8 against onnxruntime's float32.
        "openvino_int8_vs_onnx_float32_batch32": ratio("openvino_int8", "onnx_float32"),
        "openvino": report["latency_settings"].get("openvino"),
        "int8_recipe": report["quantization"]["recipe"],
        "int8_recipes_tried": report["quantization"]["tried"],
        "int8_mac_share": report["operators"]["model.int8.onnx"]["int8_mac_share"],
        "int8_parity": parity["int8"],
        "openvino_parity": {name: figures for name, figures in parity.items()
                            if name.startswith("openvino_")},
        "test_accuracy": parity["accuracy"],
        "parity_images": parity["images"],
        "test_split_images": parity["test_split_images"],
        "cpu": report["latency_settings"]["cpu"],
        "export_status": report.get("status"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--data", type=Path, default=DATA,
                        help="class folders under train/validation/test")
    parser.add_argument("--image-size", type=int, default=0, help="default: each model's own")
    parser.add_argument("--images-per-class", default="40,10,50",
                        help="TRAIN,VALIDATION,TEST: images of each class taken from each split")
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="a finished run directory to export and time as it is, instead of "
                             "training a short run (repeatable; --models none then trains nothing)")
    args = parser.parse_args(argv)
    names = [] if args.models == "none" else args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    missing = [str(run_dir) for run_dir in args.run if not (run_dir / "MANIFEST.json").is_file()]
    if missing:
        parser.error(f"--run {', '.join(missing)}: not a finished run (no MANIFEST.json)")
    if names and not args.data.is_dir():
        raise SystemExit(f"data not found at {args.data}")
    try:
        per_class = dict(zip(("train", "validation", "test"),
                             (int(count) for count in args.images_per_class.split(",")), strict=True))
    except ValueError:
        parser.error(f"--images-per-class {args.images_per_class}: expected three integers, "
                     "TRAIN,VALIDATION,TEST")
    size = {"IMAGE_SIZE": str(args.image_size)} if args.image_size else {}
    with tempfile.TemporaryDirectory() as work:
        data = link_slice(args.data, Path(work) / "data", per_class) if names else None
        results = {name: measure(name, {**MODELS[name], **size}, data, Path(work), args.latency_runs)
                   for name in names}
        results.update({f"run:{run_dir}": export_and_time(run_dir, Path(work), args.latency_runs, {})
                        for run_dir in args.run})
    print(json.dumps({"cpus": os.cpu_count(), "load_average": os.getloadavg(), **results}, indent=1))


if __name__ == "__main__":
    main()
