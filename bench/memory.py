"""Peak memory of the job as the data set grows: one run on N training images, one on 4N.

Runs `python -m job` under /usr/bin/time -v on two slices of the real chest X-ray set (same image
size, same settings) and prints JSON with each run's peak RSS and their ratio. The pipeline
streams decoded images through on-disk caches, so the ratio should stay near 1. MobileNetV2
alpha 0.5 with the real weights from ../shared by default; --backbone, --weights (a .h5 file or
none) and --data (class folders under train/validation/test) run it on something else; --set
changes a job setting of both runs (HEAD_EPOCHS=2 and FINE_TUNE_EPOCHS=1 unless set).

    python -m bench.memory [--per-class 290] [--image-size 224] [--backbone mobilenet_v2]
        [--weights FILE|none] [--data DIR] [--set NAME=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "chest_xray_pneumonia_224"

from devkit import job_settings  # noqa: E402
from devkit.datasets import link_slice  # noqa: E402

WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"


def peak_rss_of_job(data_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    weights = args.weights if args.weights == "none" else str(Path(args.weights).resolve())
    env = {**os.environ, "DATA_URI": str(data_dir), "OUTPUT_URI": str(work / "out"),
           "RUN_ID": "memory", "CACHE_DIR": str(work / "cache"), "BACKBONE": args.backbone,
           "ALPHA": "0.5", "WEIGHTS": weights, "IMAGE_SIZE": str(args.image_size),
           "HEAD_EPOCHS": "2", "FINE_TUNE_EPOCHS": "1", "PYTHONPATH": str(REPO), **args.settings}
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "job"], env=env,
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    metrics = json.loads((work / "out" / "memory" / "metrics.json").read_text())
    return {"train_images": sum(metrics["class_counts"]["train"].values()),
            "peak_rss_mib": round(peak_kib / 1024, 1), "wall": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=290, help="N/2: training images per class")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default=str(WEIGHTS), help="a Keras .h5 file, or none")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="class folders under train/validation/test")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a job setting of both runs, e.g. --set FINE_TUNE_EPOCHS=0 (repeatable)")
    args = parser.parse_args(argv)
    args.settings = job_settings.parsed(parser, args.set)
    if not args.data.is_dir():
        raise SystemExit(f"data not found at {args.data}")
    runs = []
    for per_class in (args.per_class, 4 * args.per_class):
        with tempfile.TemporaryDirectory() as work:
            data_dir = link_slice(args.data, Path(work) / "data",
                                  {"train": per_class, "validation": 50, "test": 50})
            runs.append(peak_rss_of_job(data_dir, Path(work), args))
    print(json.dumps({"backbone": args.backbone, "image_size": args.image_size, "runs": runs,
                      "rss_ratio_4x_data": round(runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3)}))


if __name__ == "__main__":
    main()
