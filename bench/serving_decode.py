"""How close the SavedModel's in-graph decode (job/training/serving.py, the image-bytes signature) is to
training's decoder, edge.images.load_image, on real images. Prints JSON.

    .venv/bin/python -m bench.serving_decode --data ../shared/data/intel_scenes,../shared/data/clothing10 \
        --size 224 [--run RUN_DIR --run-data DATA_DIR]

Per data set, over its test/ images: the largest and mean absolute pixel difference (0-255) and the
share of pixel values that differ. With --run: the run's `serving_default` fed the files of
RUN_DATA's test/ images against its float32 `serve` fed load_image: label agreement and the
largest probability difference.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from edge.images import load_image, load_images
from edge.runtime import predict_labels
from job.training import serving


def test_images(root: Path) -> list[Path]:
    return sorted(path for path in (root / "test").rglob("*") if path.is_file())


def pixel_figures(paths: list[Path], size: int) -> dict:
    decode = tf.function(lambda encoded: serving.decode_image(encoded, size))
    largest, total, differing, count = 0.0, 0.0, 0, 0
    for path in paths:
        difference = np.abs(decode(tf.constant(path.read_bytes())).numpy()
                            - load_image(str(path), size).astype(np.float32))
        largest = max(largest, float(difference.max()))
        total += float(difference.sum())
        differing += int(np.count_nonzero(difference))
        count += difference.size
    return {"images": len(paths), "size": size, "max_abs_diff": largest,
            "mean_abs_diff": round(total / count, 5), "differing_values": round(differing / count, 5)}


def run_figures(run_dir: Path, paths: list[Path], batch: int = 32) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    size, threshold = metrics["record"]["image_size"], metrics["decision_threshold"]
    loaded = tf.saved_model.load(str(run_dir / "saved_model"))
    by_bytes, by_pixels = [], []
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        by_bytes.append(loaded.signatures[serving.BYTES_SIGNATURE](
            image_bytes=tf.constant([path.read_bytes() for path in chunk]))["probabilities"].numpy())
        by_pixels.append(loaded.signatures[serving.PIXELS_SIGNATURE](
            image=tf.constant(load_images([str(path) for path in chunk], size)))["output_0"].numpy())
    by_bytes, by_pixels = np.concatenate(by_bytes), np.concatenate(by_pixels)
    return {"run": str(run_dir), "images": len(paths), "size": size, "threshold": threshold,
            "label_agreement": float(np.mean(predict_labels(by_bytes, threshold)
                                             == predict_labels(by_pixels, threshold))),
            "max_probability_diff": float(np.abs(by_bytes - by_pixels).max())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="comma-separated data set folders")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--run", type=Path, help="a run directory (with saved_model/)")
    parser.add_argument("--run-data", type=Path, help="the data set folder the run's classes are from")
    args = parser.parse_args(argv)
    report = {"pixels": {Path(folder).name: pixel_figures(test_images(Path(folder)), args.size)
                         for folder in filter(None, args.data.split(","))}}
    if args.run:
        report["run"] = run_figures(args.run, test_images(args.run_data))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
