"""Quality benchmark: the job on real data sets, against a linear probe of its frozen backbone.

For each data set (--data, several allowed) and seed (--seeds), this script owns two measurements
made in the same run, on the same train/validation/test images:

- The job. `python -m job` runs once per configuration, each in a fresh process with only
  DATA_URI, BACKBONE, ALPHA, WEIGHTS and SEED set (plus TTA=1, which changes evaluation only, so
  that every row has its scores with and without test-time augmentation), the --set settings and
  the ablation's own overrides:

    default           the job's defaults
    no_augmentation   AUGMENT=0
    no_fine_tuning    FINE_TUNE_EPOCHS=0
    no_pretraining    WEIGHTS=none: every layer trained from random weights, in one phase
    dense_head        DENSE_UNITS=256 DROPOUT=0.5: the hidden-layer head, trained by Adam
    lr_x0.1, lr_x10   both learning rates (HEAD_ and FINE_TUNE_) divided or multiplied by 10

- The linear probe, in this process: the pooled features of the frozen conv base (the job's
  backbone, weights, preprocessing and image size, through job.training.model.build_base and
  build_classifier(...).feature_extractor, in float32), on exactly the job's splits
  (job.inputs.data.load_dataset with the settings job.config.Config reads from the same environment,
  SEED included), without augmentation, fitted by job.training.probe (the job's own phase 1 under its
  default linear head): centred on the training features and divided by one scale, a
  multinomial logistic regression (L2) per C of job.training.probe.C_GRID on the training split, the C
  with the best validation accuracy (ties: the lower validation log loss) kept and scored on the
  test split, with no refit. Classes are weighted as the job weights them (balanced when CLASS_WEIGHTS
  is auto and the training split is imbalanced). For two classes it is also scored at its own
  validation-chosen threshold, as the job is. The probe is a floor: a job that does not beat a
  logistic regression on its own frozen features has a training problem, not a data problem.

Prints one JSON object on stdout (progress goes to stderr):

    {"backbone", "alpha", "subset_per_class", "settings", "c_grid",
     "rows": [{"data", "seed", "classes", "images": {split: count},
               "probe": {"C", "unconverged_C", "validation", "test", "feature_seconds",
                         "wall_seconds"},
               "runs": {ablation: {"overrides", "wall_seconds", "decision_threshold",
                                   "phase1", "phase2", "versus_probe"}}}]}

one row per data set and seed. "validation" and "test" of the probe and "versus_probe" of a run
hold accuracy and macro_recall (and for two classes roc_auc and accuracy_at_threshold); the job's
figures there are its final test scores without TTA (with TTA: accuracy_tta), beside the error
ratio job_error / probe_error (below 1: the job beats the probe) and whether the job's split
counts equal the probe's. phase1/phase2 hold each phase's validation and test scores with and
without TTA, per-class recall and the threshold chosen on validation. A failed run holds its exit
code and log tail instead. --subset N runs on the first N images of each class of each split
(symlinked), for a quick look; the table says what was run.

    python -m bench.quality --data ../shared/data/intel_scenes,../shared/data/clothing10 \\
        --backbone mobilenet_v2 --alpha 0.5 \\
        --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5 \\
        [--seeds 42,1,2] [--ablations default,no_augmentation,...] [--subset N] [--work DIR] \\
        [--set NAME=VALUE]
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from devkit import job_settings  # noqa: E402
from devkit.datasets import link_slice  # noqa: E402
from job.config import Config  # noqa: E402
from job.inputs import data
from job.results import scoring
from job.training import model, probe

ABLATIONS = {
    "default": {},
    "no_augmentation": {"AUGMENT": "0"},
    "no_fine_tuning": {"FINE_TUNE_EPOCHS": "0"},
    "no_pretraining": {"WEIGHTS": "none"},
    "dense_head": {"DENSE_UNITS": "256", "DROPOUT": "0.5"},  # the head before the probe's
    "lr_x0.1": "scale 0.1",
    "lr_x10": "scale 10",
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="quality-"))
    base_env = {"BACKBONE": args.backbone, "ALPHA": args.alpha, "TTA": "1",
                "WEIGHTS": args.weights if args.weights in ("none", "imagenet")
                else str(Path(args.weights).resolve()),
                **args.settings}
    table = {"backbone": args.backbone, "alpha": args.alpha, "subset_per_class": args.subset or None,
             "settings": args.settings, "c_grid": probe.C_GRID, "rows": []}
    for index, source in enumerate(args.data):
        place = work / f"{index}-{Path(source).name}"
        root = Path(source).resolve()
        if args.subset:
            root = subset(root, place / f"subset-{args.subset}", args.subset)
        for seed in args.seeds:
            env = {**base_env, "DATA_URI": str(root), "SEED": str(seed),
                   "OUTPUT_URI": str(place / "out"), "CACHE_DIR": str(place / "cache")}
            table["rows"].append(benchmark(source, seed, env, args.ablations, place / "out"))
    print(json.dumps(table, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True,
                        help="class-per-folder images (with or without train/validation/test); "
                             "comma-separated or repeated")
    parser.add_argument("--seeds", default="42",
                        help="comma-separated: SEED of the job, the split and the probe")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--alpha", default="0.5")
    parser.add_argument("--weights", required=True, help="a local Keras .h5 file, none or imagenet")
    parser.add_argument("--ablations", default=",".join(ABLATIONS),
                        help="comma-separated, from: " + ", ".join(ABLATIONS))
    parser.add_argument("--subset", type=int, default=0, help="first N images per class and split")
    parser.add_argument("--work", default="", help="where runs go (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a job setting for every run, e.g. --set AUGMENT_VIEWS=4 (repeatable)")
    args = parser.parse_args(argv)
    args.data = [item for value in args.data for item in value.split(",") if item]
    args.ablations = args.ablations.split(",")
    unknown = sorted(set(args.ablations) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown ablations {unknown}; choose from {', '.join(ABLATIONS)}")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected integers such as 42,1,2")
    args.settings = job_settings.parsed(parser, args.set)
    if "SEED" in args.settings:
        parser.error("--set SEED: use --seeds, which also seeds the probe's split")
    return args


def subset(root: Path, target: Path, per_class: int) -> Path:
    """The first per_class images of each class of each split folder of root, symlinked."""
    splits = [name for name in data.SPLITS if (root / name).is_dir()]
    if splits:
        return link_slice(root, target, {name: per_class for name in splits})
    # Class folders at the root: sliced as one split folder, which the job then splits itself.
    return link_slice(root.parent, target, {root.name: per_class}) / root.name


def benchmark(source: str, seed: int, env: dict[str, str], ablations: list[str],
              out: Path) -> dict:
    """One row: the probe, then each configuration's job run, on one data set and seed."""
    print(f"probe {source} seed {seed}", file=sys.stderr, flush=True)
    dataset, probe = linear_probe({**env, "RUN_ID": "probe"})
    row = {"data": source, "seed": seed, "classes": dataset.class_names,
           "images": {name: len(getattr(dataset, name)) for name in data.SPLITS},
           "probe": probe, "runs": {}}
    for name in ablations:
        overrides = learning_rates(ABLATIONS[name], env["BACKBONE"]) \
            if isinstance(ABLATIONS[name], str) else ABLATIONS[name]
        run_id = f"{name}-seed{seed}"
        print(f"running {source} {run_id} {overrides}", file=sys.stderr, flush=True)
        result, metrics = run({**env, **overrides, "RUN_ID": run_id}, out / run_id)
        if metrics:
            result["versus_probe"] = versus_probe(metrics, probe, dataset)
        row["runs"][name] = {"overrides": overrides, **result}
    return row


def learning_rates(scale_spec: str, backbone: str) -> dict[str, str]:
    """The job's default head and fine-tuning learning rates for backbone, scaled."""
    defaults = Config.from_env({"DATA_URI": "-", "BACKBONE": backbone})
    scale = float(scale_spec.split()[1])
    return {"HEAD_LEARNING_RATE": f"{defaults.head_learning_rate * scale:g}",
            "FINE_TUNE_LEARNING_RATE": f"{defaults.fine_tune_learning_rate * scale:g}"}


def linear_probe(env: dict[str, str]) -> tuple[data.DataSet, dict]:
    """The job's data set as its settings split it, and the probe's scores on it."""
    started = time.perf_counter()
    config = Config.from_env(env)
    dataset = data.load_dataset(Path(config.data_uri), config.image_size, config.validation_split,
                                config.test_split, config.seed)
    feature_started = time.perf_counter()
    features = frozen_features(config, dataset)
    feature_seconds = time.perf_counter() - feature_started
    labels = {name: np.asarray(getattr(dataset, name).labels) for name in data.SPLITS}
    fitted = probe.fit((features["train"], labels["train"]),
                       (features["validation"], labels["validation"]),
                       balanced=config.class_weights == "auto" and data.is_imbalanced(
                           dataset.train.label_counts(len(dataset.class_names))))
    scores = probe_scores(fitted, features, labels, dataset.class_names)
    return dataset, {"C": fitted.c, "unconverged_C": fitted.unconverged, **scores,
                     "feature_seconds": round(feature_seconds, 1),
                     "wall_seconds": round(time.perf_counter() - started, 1)}


def frozen_features(config: Config, dataset: data.DataSet) -> dict[str, np.ndarray]:
    """Pooled features of the frozen base per split, as the job's phase 1 head would see them
    without augmentation."""
    keras.utils.set_random_seed(config.seed)  # WEIGHTS=none: the job's seed, the same random base
    weights = None if config.weights == "none" else config.weights
    base, mode = model.build_base(config.backbone, config.alpha, weights, config.image_size)
    extractor = model.build_classifier(base, mode, len(dataset.class_names), config.image_size,
                                       config.dense_units, config.dropout).feature_extractor
    features = {name: extractor.predict(data.image_dataset(getattr(dataset, name), config.image_size,
                                                           config.batch_size), verbose=0)
                for name in data.SPLITS}
    keras.backend.clear_session()
    return features


def probe_scores(fitted: probe.Probe, features: dict[str, np.ndarray],
                 labels: dict[str, np.ndarray], class_names: list[str]) -> dict:
    """Validation and test headline scores, the job's way (job.results.scoring): for two classes the
    probability of the second class, and its threshold chosen on validation."""
    two_classes = len(class_names) == 2
    probabilities = {name: fitted.predict_proba(features[name]) for name in ("validation", "test")}
    if two_classes:
        probabilities = {name: p[:, 1:] for name, p in probabilities.items()}
    threshold = (scoring.balanced_threshold(labels["validation"], probabilities["validation"][:, 0])
                 if two_classes else 0.5)
    scores = {}
    for name, p in probabilities.items():
        metrics = scoring.classification_metrics(labels[name], p, class_names)
        if two_classes:
            metrics["at_decision_threshold"] = scoring.classification_metrics(
                labels[name], p, class_names, threshold)
        scores[name] = headline(metrics)
    return scores


def headline(split: dict) -> dict:
    """Accuracy and macro recall of one split's metrics; for two classes also ROC AUC and the
    accuracy at the decision threshold."""
    row = {"accuracy": rounded(split["accuracy"]),
           "macro_recall": rounded(np.mean([c["recall"] for c in split["per_class"].values()]))}
    if "at_decision_threshold" in split:
        row.update(roc_auc=rounded(split["roc_auc"]),
                   accuracy_at_threshold=rounded(split["at_decision_threshold"]["accuracy"]))
    return row


def rounded(value) -> float | None:
    return None if value is None else round(float(value), 4)


def versus_probe(metrics: dict, probe: dict, dataset: data.DataSet) -> dict:
    """The job's final test scores without TTA beside the probe's, and their error ratios."""
    test = metrics["test"]
    row = {**headline(test.get("without_tta", test)), "accuracy_tta": rounded(test["accuracy"])}
    probe_test = probe["test"]
    row["error_ratio"] = error_ratio(row["accuracy"], probe_test["accuracy"])
    if "accuracy_at_threshold" in row:
        row["error_ratio_at_threshold"] = error_ratio(row["accuracy_at_threshold"],
                                                      probe_test["accuracy_at_threshold"])
    # Both read the data set on their own: equal counts per class and split show they agreed.
    row["same_split_counts"] = metrics["class_counts"] == dataset.counts()
    return row


def error_ratio(accuracy: float, probe_accuracy: float) -> float | None:
    """job error / probe error; None when the probe makes no error."""
    probe_error = 1 - probe_accuracy
    return round((1 - accuracy) / probe_error, 3) if probe_error > 0 else None


def run(env: dict[str, str], run_dir: Path) -> tuple[dict, dict | None]:
    """One job run: its row of the table, and its metrics.json (None when it failed)."""
    started = time.perf_counter()
    result = job_process(env)
    wall = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        return {"exit_code": result.returncode, "wall_seconds": wall,
                "log_tail": result.stderr[-2000:]}, None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {"wall_seconds": wall, "decision_threshold": metrics["decision_threshold"]}
    for phase in ("phase1", "phase2"):
        record = metrics.get(phase)
        if record:
            row[phase] = {"epochs_run": record["epochs_run"], "seconds": record["seconds"],
                          "validation": scores(record["validation"]), "test": scores(record["test"])}
    return row, metrics


def job_process(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m job` in a fresh process with exactly the settings in env (and what any process
    needs): no setting of this one's leaks into a run."""
    return subprocess.run([sys.executable, "-m", "job"], cwd=REPO, text=True, capture_output=True,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
                               "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env})


def scores(split: dict) -> dict:
    """The headline numbers of one split, with TTA and (when recorded) without."""
    def phase_headline(s: dict) -> dict:
        row = {"accuracy": s["accuracy"], "roc_auc": s.get("roc_auc"),
               "recall": {name: round(c["recall"], 4) for name, c in s["per_class"].items()}}
        if "at_decision_threshold" in s:
            at = s["at_decision_threshold"]
            row["at_decision_threshold"] = {
                "threshold": round(at["threshold"], 4), "accuracy": at["accuracy"],
                "recall": {name: round(c["recall"], 4) for name, c in at["per_class"].items()}}
        return row

    row = phase_headline(split)
    if "without_tta" in split:
        row = {"tta": row, "without_tta": phase_headline(split["without_tta"])}
    return row


if __name__ == "__main__":
    main()
