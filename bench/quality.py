"""Quality benchmark: the job with its defaults on a real data set, and what each part contributes.

Runs `python -m job` once per configuration, each in a fresh process with only DATA_URI,
BACKBONE, ALPHA and WEIGHTS set (plus TTA=1, which changes evaluation only, so that every row
has its scores with and without test-time augmentation), and the ablation's own overrides:

    default           the job's defaults
    no_augmentation   AUGMENT=0
    no_fine_tuning    FINE_TUNE_EPOCHS=0
    no_pretraining    WEIGHTS=none (random initial weights)
    lr_x0.1, lr_x10   both learning rates (HEAD_ and FINE_TUNE_) divided or multiplied by 10

and prints one JSON object: per configuration and phase, test accuracy (at 0.5 and at the
threshold chosen on validation), per-class recall, ROC AUC, each with and without TTA, the
validation accuracy and AUC, and the run's wall time. --subset N runs on the first N images of
each class of each split (symlinked), for a quick look; the table says what was run.

    python bench/quality.py --data ../shared/data/chest_xray_pneumonia_224 --backbone mobilenet_v2 \\
        --alpha 0.5 --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5 \\
        [--ablations default,no_augmentation,...] [--subset N] [--work DIR] [--set NAME=VALUE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import link_slice  # noqa: E402

ABLATIONS = {
    "default": {},
    "no_augmentation": {"AUGMENT": "0"},
    "no_fine_tuning": {"FINE_TUNE_EPOCHS": "0"},
    "no_pretraining": {"WEIGHTS": "none"},
    "lr_x0.1": "scale 0.1",
    "lr_x10": "scale 10",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="class-per-folder images, with train/validation/test")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", default="0.5")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--ablations", default=",".join(ABLATIONS),
                        help="comma-separated, from: " + ", ".join(ABLATIONS))
    parser.add_argument("--subset", type=int, default=0, help="first N images per class and split")
    parser.add_argument("--work", default="", help="where runs go (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a job setting for every run, e.g. --set AUGMENT_VIEWS=4 (repeatable)")
    args = parser.parse_args()
    names = args.ablations.split(",")
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown ablations {unknown}; choose from {', '.join(ABLATIONS)}")

    work = Path(args.work or tempfile.mkdtemp(prefix="quality-"))
    data = Path(args.data).resolve()
    if args.subset:
        data = link_slice(data, work / f"subset-{args.subset}",
                          {split.name: args.subset for split in data.iterdir() if split.is_dir()})
    base_env = {"DATA_URI": str(data), "BACKBONE": args.backbone, "ALPHA": args.alpha,
                "WEIGHTS": str(Path(args.weights).resolve()), "TTA": "1"}
    malformed = [item for item in args.set if "=" not in item]
    if malformed:
        parser.error(f"--set {malformed[0]!r}: expected NAME=VALUE")
    settings = dict(item.split("=", 1) for item in args.set)
    base_env.update(settings)
    table = {"data": args.data, "subset_per_class": args.subset or None, "backbone": args.backbone,
             "alpha": args.alpha, "settings": settings, "runs": {}}
    for name in names:
        overrides = learning_rates(ABLATIONS[name], args.backbone) \
            if isinstance(ABLATIONS[name], str) else ABLATIONS[name]
        env = {**base_env, **overrides, "OUTPUT_URI": str(work / "out"), "RUN_ID": name,
               "CACHE_DIR": str(work / "cache")}
        print(f"running {name} {overrides}", file=sys.stderr, flush=True)
        table["runs"][name] = {"overrides": overrides, **run(env, work / "out" / name)}
    print(json.dumps(table, indent=2))


def learning_rates(scale_spec: str, backbone: str) -> dict[str, str]:
    """The job's default head and fine-tuning learning rates for backbone, scaled."""
    from job.config import Config

    defaults = Config.from_env({"DATA_URI": "-", "BACKBONE": backbone})
    scale = float(scale_spec.split()[1])
    return {"HEAD_LEARNING_RATE": f"{defaults.head_learning_rate * scale:g}",
            "FINE_TUNE_LEARNING_RATE": f"{defaults.fine_tune_learning_rate * scale:g}"}


def run(env: dict[str, str], run_dir: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "job"], cwd=REPO, text=True, capture_output=True,
                            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
                                 "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env})
    wall = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        return {"exit_code": result.returncode, "wall_seconds": wall, "log_tail": result.stderr[-2000:]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {"wall_seconds": wall, "decision_threshold": metrics["decision_threshold"]}
    for phase in ("phase1", "phase2"):
        record = metrics.get(phase)
        if record:
            row[phase] = {"epochs_run": record["epochs_run"], "seconds": record["seconds"],
                          "validation": scores(record["validation"]), "test": scores(record["test"])}
    return row


def scores(split: dict) -> dict:
    """The headline numbers of one split, with TTA and (when recorded) without."""
    def headline(s: dict) -> dict:
        row = {"accuracy": s["accuracy"], "roc_auc": s.get("roc_auc"),
               "recall": {name: round(c["recall"], 4) for name, c in s["per_class"].items()}}
        if "at_decision_threshold" in s:
            at = s["at_decision_threshold"]
            row["at_decision_threshold"] = {
                "threshold": round(at["threshold"], 4), "accuracy": at["accuracy"],
                "recall": {name: round(c["recall"], 4) for name, c in at["per_class"].items()}}
        return row

    row = headline(split)
    if "without_tta" in split:
        row = {"tta": row, "without_tta": headline(split["without_tta"])}
    return row


if __name__ == "__main__":
    main()
