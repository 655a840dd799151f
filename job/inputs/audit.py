"""Audit: audit.json, what the run's data holds that its scores do not show.

Built from what the run already has, with no extra pass through the network:
- duplicates: exact (the same SHA-256 of the file bytes) and near (cosine of the pooled features
  the linear probe fits on, centred on the training mean, at least NEAR_DUPLICATE_COSINE), listed
  as "cross_split_duplicates" (two splits: a leak that inflates the scores),
  "within_split_duplicates" and "cross_class_duplicates" (one image under two labels);
- "label_issues": training images whose folder label is likely wrong, by confident learning
  (Northcutt et al. 2021) on out-of-fold probabilities of the probe (the run's C, FOLDS folds):
  an image is flagged when another class's probability reaches that class's mean
  self-confidence while its own label's does not win; score 1 - p(given label), highest first;
- the class balance and the skipped files, as metrics.json has them.
It informs and removes nothing, unless DROP_CROSS_SPLIT_DUPLICATES is on: then, before training,
drop_cross_split_duplicates leaves out the training images whose bytes equal a validation or test
image's, and audit.json lists them under "dropped_from_training". Features exist only for runs whose phase 1 is the linear probe
(DENSE_UNITS=0, pretrained base): other runs get the exact duplicates alone, and say so. Without
CACHE_FEATURES the test images have no pooled features: their near duplicates are not sought.

Of a cluster, every worker hashes its own shard and contributes its features; all gather the
whole, and the chief's copy is the one published.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from common import run_files
from job.cluster import distribute
from job.inputs import data

log = logging.getLogger("job")
FILE = "audit.json"
KEY = "data_audit"  # metrics.json's summary, which report.html shows
# Chosen on real data (README, step 5): MobileNetV2 features of intel_scenes' two real near
# duplicates (shifted crops) score 0.91 and 0.97; distinct images' nearest neighbours <= 0.80.
NEAR_DUPLICATE_COSINE = 0.9
FOLDS = 5
SHOWN = 24  # entries of each list kept in metrics.json (and shown); audit.json has them all
_BLOCK = 1024  # rows of the similarity matrix computed at once: 1024 x images float32


@dataclasses.dataclass(frozen=True)
class Images:
    """Every image of the data set: split, path relative to the data root, label, file digest;
    and, per split that has them, the pooled features (rows in the same order)."""

    splits: list[str]
    paths: list[str]
    labels: np.ndarray
    digests: list[str]
    features: np.ndarray | None  # (images, features); rows of images without features are NaN


def file_digests(paths: list[str]) -> list[str]:
    """SHA-256 of each file (hashlib releases the GIL: a thread pool reads them in parallel)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(run_files.sha256, paths))


def drop_cross_split_duplicates(dataset: data.DataSet,
                                strategy) -> tuple[data.DataSet, list[dict]]:
    """The data set without the training images whose bytes equal a validation or test image's
    (of any worker's shard), and those images of every worker: their path and the held-out image
    they repeat, relative to the data root; their number logged in one line."""
    held_out = {}
    for name in ("validation", "test"):
        split = getattr(dataset, name)
        for text in distribute.gather_texts(
                [f"{digest}\t{_relative(path, dataset.root)}"
                 for path, digest in zip(split.paths, file_digests(split.paths))], strategy):
            digest, path = text.split("\t")
            held_out.setdefault(digest, path)
    train, dropped, kept = dataset.train, [], data.Split([], [])
    for path, label, digest in zip(train.paths, train.labels, file_digests(train.paths)):
        if digest in held_out:
            dropped.append(f"{_relative(path, dataset.root)}\t{held_out[digest]}")
        else:
            kept.paths.append(path)
            kept.labels.append(label)
    dropped = [dict(zip(("path", "same_bytes_as"), text.split("\t")))
               for text in distribute.gather_texts(dropped, strategy)]
    log.info("audit: DROP_CROSS_SPLIT_DUPLICATES=1: %d training image(s) dropped, their bytes "
             "those of a validation or test image (listed in %s)", len(dropped), FILE)
    return dataclasses.replace(dataset, train=kept), dropped


def _relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def duplicate_pairs(images: Images, threshold: float = NEAR_DUPLICATE_COSINE) -> list[dict]:
    """Every pair of images with the same bytes (exact) or features at least threshold alike
    (near), the most alike first."""
    pairs = {}
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(images.digests):
        groups.setdefault(digest, []).append(index)
    for members in groups.values():
        for position, first in enumerate(members):
            for second in members[position + 1:]:
                pairs[(first, second)] = ("exact", 1.0)
    for first, second, cosine in near_pairs(images, threshold):
        pairs.setdefault((first, second), ("near", cosine))
    rows = [_pair(images, first, second, kind, similarity)
            for (first, second), (kind, similarity) in pairs.items()]
    return sorted(rows, key=lambda row: -row["similarity"])


def near_pairs(images: Images, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine), i < j, of the images with features whose centred cosine reaches threshold,
    computed block by block (memory: _BLOCK x images floats)."""
    if images.features is None:
        return []
    rows = np.flatnonzero(~np.isnan(images.features).any(axis=1))
    train = [index for index in rows if images.splits[index] == "train"]
    features = images.features[rows].astype(np.float32)
    features -= images.features[train].mean(axis=0) if train else features.mean(axis=0)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    found = []
    for start in range(0, len(rows), _BLOCK):
        cosine = features[start:start + _BLOCK] @ features.T
        for i, j in zip(*np.nonzero(cosine >= threshold)):
            if start + i < j:
                found.append((int(rows[start + i]), int(rows[j]), float(cosine[i, j])))
    return found


def _pair(images: Images, first: int, second: int, kind: str, similarity: float) -> dict:
    return {"kind": kind, "similarity": round(similarity, 4),
            "a": images.paths[first], "a_split": images.splits[first],
            "a_label": int(images.labels[first]),
            "b": images.paths[second], "b_split": images.splits[second],
            "b_label": int(images.labels[second])}


def label_issues(features: np.ndarray, labels: np.ndarray, c: float, balanced: bool,
                 seed: int) -> list[dict]:
    """Training images likely misfiled, most likely first (see the module docstring): index,
    given and suggested label and score."""
    labels = np.asarray(labels).astype(int)
    counts = np.bincount(labels)
    folds = min(FOLDS, int(counts[counts > 0].min()))
    if folds < 2 or np.count_nonzero(counts) < 2:
        return []
    mean = features.mean(axis=0)  # scaled as job.training.probe scales, so the run's C means the same
    scale = float(np.sqrt(np.mean((features - mean) ** 2))) or 1.0
    regression = LogisticRegression(C=c, max_iter=2000,
                                    class_weight="balanced" if balanced else None)
    probabilities = np.zeros((len(labels), len(counts)))
    present = np.flatnonzero(counts)
    # One BLAS thread: lbfgs multiplies small matrices (images x features x classes) hundreds of
    # times, and OpenBLAS's second thread spins waiting for work between them; beside TensorFlow's
    # pools and other processes on a loaded 2-core machine that took 15x the CPU (intel_scenes:
    # 22.5 s wall, 16 s CPU against 2.3 s, 1.1 s), flagging the same images (docs/training.md).
    with threadpool_limits(1, user_api="blas"):
        probabilities[:, present] = cross_val_predict(
            regression, (features - mean) / scale, labels,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")
    self_confidence = probabilities[np.arange(len(labels)), labels]
    thresholds = np.array([self_confidence[labels == k].mean() if counts[k] else np.inf
                           for k in range(len(counts))])
    confident = np.where(probabilities >= thresholds, probabilities, -1.0)
    suggested = confident.argmax(axis=1)
    flagged = (confident.max(axis=1) >= 0) & (suggested != labels) & \
        (probabilities[np.arange(len(labels)), suggested] > self_confidence)
    issues = [{"index": int(i), "given": int(labels[i]), "suggested": int(suggested[i]),
               "score": round(float(1 - self_confidence[i]), 4)} for i in np.flatnonzero(flagged)]
    return sorted(issues, key=lambda issue: -issue["score"])


def collect(dataset, pooled: dict[str, tuple[np.ndarray, np.ndarray]] | None,
            strategy) -> Images:
    """The Images of every worker's shard (the whole data set on one machine), hashed here;
    pooled: (features, labels) per split that has them, in the split's order, or None."""
    splits, paths, labels, digests, features = [], [], [], [], []
    width = next((len(x[0]) for x, _ in (pooled or {}).values() if len(x)), 0)
    for name in data.SPLITS:
        split = getattr(dataset, name)
        texts = distribute.gather_texts(
            [f"{_relative(path, dataset.root)}\t{digest}"
             for path, digest in zip(split.paths, file_digests(split.paths))], strategy)
        split_labels = distribute.gather_rows(np.asarray(split.labels, np.int32), strategy)
        own = (pooled or {}).get(name)
        if own is not None and not np.array_equal(own[1], split.labels):
            raise ValueError(f"the pooled {name} features are not in the order of its images")
        rows = np.full((len(split_labels), width), np.nan, np.float32)
        # A worker whose shard has no image of a split has no features of it, the others may:
        # all gather (a collective) when any has them.
        if pooled is not None and distribute.largest(int(own is not None), strategy):
            rows = distribute.gather_rows(own[0].astype(np.float32) if own is not None
                                          else np.zeros((0, width), np.float32), strategy)
        splits += [name] * len(texts)
        paths += [text.split("\t")[0] for text in texts]
        digests += [text.split("\t")[1] for text in texts]
        labels.append(split_labels)
        features.append(rows)
    return Images(splits, paths, np.concatenate(labels), digests,
                  np.concatenate(features) if pooled else None)


def audit_run(dataset, pooled: dict[str, tuple[np.ndarray, np.ndarray]] | None,
              probe_c: float | None, balanced: bool, seed: int, counts: dict, skipped: dict,
              strategy, dropped: list[dict] | None = None) -> dict:
    """The run's audit (collect, then audit), timed whole and logged in one line; dropped: what
    drop_cross_split_duplicates left out of training (None: DROP_CROSS_SPLIT_DUPLICATES off)."""
    started = time.perf_counter()
    images = collect(dataset, pooled, strategy)
    collected = time.perf_counter() - started
    audited = audit(images, dataset.class_names, probe_c if pooled else None, balanced, seed,
                    counts, skipped)
    audited["dropped_from_training"] = dropped
    audited["seconds"] = round(time.perf_counter() - started, 2)
    audited["seconds_by_step"]["hashing_and_gathering"] = round(collected, 2)
    log_line(audited)
    return audited


def audit(images: Images, class_names: list[str], probe_c: float | None, balanced: bool,
          seed: int, counts: dict, skipped: dict) -> dict:
    """audit.json's content (see the module docstring); probe_c None: no features, no label
    issues nor near duplicates."""
    started = time.perf_counter()
    pairs = [{**pair, "a_label": class_names[pair["a_label"]],
              "b_label": class_names[pair["b_label"]]} for pair in duplicate_pairs(images)]
    paired = time.perf_counter()
    train = np.flatnonzero(np.asarray(images.splits) == "train")
    issues = None
    if images.features is not None and probe_c is not None:
        issues = [{"path": images.paths[train[issue["index"]]],
                   "given_label": class_names[issue["given"]],
                   "suggested_label": class_names[issue["suggested"]], "score": issue["score"]}
                  for issue in label_issues(images.features[train], images.labels[train],
                                            probe_c, balanced, seed)]
    return {
        "near_duplicate_cosine": NEAR_DUPLICATE_COSINE if images.features is not None else None,
        "notes": [] if issues is not None else [
            "no pooled features (phase 1 is not a linear probe: DENSE_UNITS > 0 or WEIGHTS=none): "
            "exact duplicates only, no near duplicates nor label issues"],
        "cross_split_duplicates": [p for p in pairs if p["a_split"] != p["b_split"]],
        "within_split_duplicates": [p for p in pairs if p["a_split"] == p["b_split"]],
        "cross_class_duplicates": [p for p in pairs if p["a_label"] != p["b_label"]],
        "label_issues": issues,
        "class_counts": counts,
        "skipped_files": skipped,
        "seconds": None,  # audit_run's, hashing included
        "seconds_by_step": {"duplicates": round(paired - started, 2),
                            "label_issues": round(time.perf_counter() - paired, 2)},
    }


def summary(audited: dict) -> dict:
    """metrics.json's "data_audit": each list's length and its first SHOWN entries."""
    lists = ("cross_split_duplicates", "within_split_duplicates", "cross_class_duplicates",
             "label_issues")
    result = {"counts": {name: None if audited[name] is None else len(audited[name])
                         for name in lists},
              "near_duplicate_cosine": audited["near_duplicate_cosine"],
              "notes": audited["notes"], "seconds": audited["seconds"]}
    result.update({name: (audited[name] or [])[:SHOWN] for name in lists})
    return result


def log_line(audited: dict) -> None:
    counts = summary(audited)["counts"]
    exact = sum(pair["kind"] == "exact" for pair in audited["cross_split_duplicates"])
    issues = "not sought" if counts["label_issues"] is None else counts["label_issues"]
    dropped = audited.get("dropped_from_training")
    removed = ("removed nothing (DROP_CROSS_SPLIT_DUPLICATES=1 drops the exact leaks from "
               "training)" if dropped is None else f"{len(dropped)} exact leak(s) dropped from "
               "training (DROP_CROSS_SPLIT_DUPLICATES=1)")
    log.info("audit: %d cross-split duplicates (leaks: %d exact, %d near), %d within a split, %d "
             "across classes; likely label issues: %s; %s; in %.1f s (%s)",
             counts["cross_split_duplicates"], exact, counts["cross_split_duplicates"] - exact,
             counts["within_split_duplicates"], counts["cross_class_duplicates"], issues, removed,
             audited["seconds"], FILE)
