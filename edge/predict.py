"""Edge predictor: `python -m edge.predict MODEL INPUT` labels images with an exported ONNX model.

Needs only onnxruntime, numpy and Pillow (through edge.images, the decoder training used, so the
resizing matches); it never imports TensorFlow. `--runtime openvino` runs the same ONNX file with
OpenVINO instead (optional: `pip install -r requirements-openvino.txt`). INPUT is an image file or
a folder, searched recursively as the training job searches its data (edge.files: links followed,
each real file once, links that loop skipped; hidden files left out). Each image gets its label,
that label's probability and the top-k classes, printed as one line each or written to --output
(.csv or .json). A file that is not a usable image, and a link skipped, gets one error line on
stderr (text or JSON, as LOG_FORMAT says; see edge.logs) with its reason, and the rest are still
predicted. Images are decoded one at a time within edge.images' memory budget.

For two classes the label is the second class when its probability reaches the threshold:
--threshold, else the model's `decision_threshold` metadata (recorded by the training run), else 0.5.

Exit codes: 0 at least one image was predicted; 1 none could be (every file failed, or the folder
holds no files); 2 bad arguments, a runtime that is not installed, or a model that cannot be loaded.

`--self-test PATH` (a version or export folder, or one ONNX file beside its selftest/) instead runs
each ONNX file on the self-test set the export stored with it and judges it by the export's gate
(edge.selftest): exit 0 every file passed, 1 one failed, 2 no self-test set.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from edge import logs
from edge.files import Finder, file_problem, relative
from edge.images import ImageError, load_image
from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from edge.runtime import (DEFAULT_RUNTIME, RUNTIMES, RuntimeUnavailable, open_model,
                          predict_labels)
from edge.selftest import self_test

BATCH_SIZE = 32


class Model:
    """An exported model and what its metadata says: labels, input size, decision threshold."""

    def __init__(self, path: str, threads: int | None = None, runtime: str = DEFAULT_RUNTIME):
        self.loaded = open_model(path, runtime, threads)
        meta = self.loaded.metadata
        size = meta.get("image_size") or self.loaded.input_shape[1]
        self.image_size = int(size)
        self.labels = json.loads(meta["labels"]) if "labels" in meta else None
        self.decision_threshold = float(meta.get("decision_threshold", 0.5))

    def outputs(self, images: np.ndarray) -> np.ndarray:
        """The model's output for float32 RGB 0-255 images: [n, 1] (the probability of class
        index 1) for two classes, [n, classes] softmax probabilities otherwise."""
        return self.loaded.run(images)

    def label_names(self, count: int) -> list[str]:
        return self.labels if self.labels and len(self.labels) == count else \
            [str(index) for index in range(count)]


def predict_files(model: Model, paths: list[Path], threshold: float, top_k: int,
                  on_error=None) -> list[dict]:
    """Predictions for every usable file, in order; on_error(path, reason) for each other one."""
    results = []
    for start in range(0, len(paths), BATCH_SIZE):
        chunk, images = [], []
        for path in paths[start:start + BATCH_SIZE]:
            try:
                images.append(load_image(str(path), model.image_size))
                chunk.append(path)
            except ImageError as error:
                if on_error:
                    on_error(path, str(error))
        if not images:
            continue
        outputs = model.outputs(np.stack(images).astype(np.float32))
        indices = predict_labels(outputs, threshold)
        probabilities = np.concatenate([1.0 - outputs, outputs], axis=-1) \
            if outputs.shape[-1] == 1 else outputs
        names = model.label_names(probabilities.shape[-1])
        for path, row, index in zip(chunk, probabilities, indices):
            order = np.argsort(-row, kind="stable")[:max(1, top_k)]
            results.append({
                "path": str(path),
                "label": names[index],
                "probability": float(row[index]),
                "top_k": [{"label": names[i], "probability": float(row[i])} for i in order],
            })
    return results


def image_files(input_path: Path) -> tuple[list[Path], dict[Path, str]]:
    """The file itself, or every file under a folder, sorted, each real file once (edge/files.py,
    the training job's walk); and what was skipped with its reason: links that loop or lead to a
    folder or file already listed, links to nothing, empty files. Hidden files are left out."""
    if input_path.is_file():
        return [input_path], {}
    skipped: dict[str, str] = {}  # path relative to input_path -> reason
    finder = Finder(input_path, skipped)
    files = []
    for path in finder.walk(input_path):
        if path.name.startswith("."):
            continue
        reason = file_problem(path) or finder.claim(path, input_path)
        if reason is None:
            files.append(path)
        else:
            skipped[relative(path, input_path)] = reason
    return files, {input_path / name: reason for name, reason in skipped.items()}


def output_problem(path: Path) -> str | None:
    """Why predictions could not be written to path, checked before any image is read, or None."""
    folder = path.parent
    if path.is_dir():
        return "is a folder"
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "is not writable"
    return None


def write_output(results: list[dict], path: Path) -> None:
    """Writes under a temporary name and renames, so path is never left half-written."""
    partial = path.with_name(path.name + ".partial")
    try:
        _write(results, partial, as_json=path.suffix.lower() == ".json")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write(results: list[dict], path: Path, as_json: bool) -> None:
    if as_json:
        path.write_text(json.dumps(results, indent=2) + "\n")
        return
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "probability", "top_k"])
        for result in results:
            writer.writerow([result["path"], result["label"], f"{result['probability']:.6f}",
                             ";".join(f"{item['label']}:{item['probability']:.6f}"
                                      for item in result["top_k"])])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m edge.predict",
        description="Label images with an exported ONNX classifier (no TensorFlow needed).")
    parser.add_argument("model", type=Path, nargs="?", help="model.onnx or model.int8.onnx")
    parser.add_argument("input", type=Path, nargs="?", help="an image file or a folder of images")
    parser.add_argument("--self-test", type=Path, metavar="PATH",
                        help="instead of predicting, test each ONNX file of PATH (a version or "
                             "export folder, or one .onnx file) on the self-test set the export "
                             "stored beside it; exit 1 if one fails")
    parser.add_argument("--top-k", type=int, default=1, help="classes to list per image (default 1)")
    parser.add_argument("--output", type=Path,
                        help="write the predictions to this .csv or .json file instead of stdout")
    parser.add_argument("--threshold", type=float,
                        help="two classes: probability of the second class from which it is the "
                             "label (default: the model's decision_threshold, else 0.5)")
    parser.add_argument("--threads", type=int, help="inference threads (default: cores)")
    parser.add_argument("--runtime", choices=sorted(RUNTIMES), default=DEFAULT_RUNTIME,
                        help="CPU runtime that runs the model (default: %(default)s; openvino "
                             "needs `pip install -r requirements-openvino.txt`)")
    args = parser.parse_args(argv)
    if args.self_test and args.model:
        parser.error("--self-test takes no MODEL or INPUT")
    if not args.self_test and not args.input:
        parser.error("MODEL and INPUT are required (or --self-test PATH)")
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be between 0 and 1")
    if args.output and args.output.suffix.lower() not in (".csv", ".json"):
        parser.error(f"--output {args.output}: the name must end in .csv or .json")
    return args


log = logging.getLogger("edge")


def main(argv: list[str] | None = None, environ=os.environ) -> int:
    try:
        logs.configure(environ)
    except logs.LogFormatError as error:
        return _error(str(error), EXIT_BAD_INPUT)
    args = parse_args(argv)
    if args.self_test:
        return self_test(args.self_test, args.runtime, args.threads)
    if not args.model.is_file():
        return _error(f"model {args.model}: no such file", EXIT_BAD_INPUT)
    if not args.input.exists():
        return _error(f"input {args.input}: no such file or folder", EXIT_BAD_INPUT)
    problem = args.output and output_problem(args.output)
    if problem:
        return _error(f"--output {args.output}: {problem}", EXIT_BAD_INPUT)
    try:
        model = Model(str(args.model), args.threads, args.runtime)
    except RuntimeUnavailable as error:
        return _error(str(error), EXIT_BAD_INPUT)
    except Exception as error:  # onnxruntime and OpenVINO raise their own exception types
        return _error(f"model {args.model}: cannot be loaded: {str(error).splitlines()[0][:200]}",
                      EXIT_BAD_INPUT)
    threshold = args.threshold if args.threshold is not None else model.decision_threshold
    paths, skipped = image_files(args.input)
    failed = []

    def on_error(path: Path, reason: str) -> None:
        failed.append(str(path))
        log.error("%s: %s", path, reason)

    for path, reason in skipped.items():
        log.error("%s: %s", path, reason)
    results = predict_files(model, paths, threshold, args.top_k, on_error)
    if args.output:
        try:
            write_output(results, args.output)
        except OSError as error:
            return _error(f"--output {args.output}: {error.strerror or error}", EXIT_FAILED)
    else:
        for result in results:
            top = " ".join(f"{item['label']}={item['probability']:.4f}" for item in result["top_k"])
            print(f"{result['path']}\t{result['label']}\t{result['probability']:.4f}\t{top}")
    log.info("predicted %d of %d file(s); %d failed; %d skipped", len(results), len(paths),
             len(failed), len(skipped))
    return EXIT_OK if results else EXIT_FAILED


def _error(message: str, code: int) -> int:
    log.error(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
