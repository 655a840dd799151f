"""Paired: two classifiers compared on the same labelled images (pure: labels and predictions in).

The promotion rule (job/promotion/promote.py) asks whether tonight's model (the challenger) is worse than
the production one (the champion) beyond the noise of one test split. Both labelled the same
images, so the comparison is paired: exact McNemar on the images where exactly one of the two is
right (the others say nothing about which is better), and a paired bootstrap (the same resampled
images for both models) of the differences in accuracy and macro recall.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Challenger minus champion on the same images; `interval` is the bootstrap 95 % interval."""

    images: int
    challenger: dict[str, float]  # accuracy, macro_recall
    champion: dict[str, float]
    only_challenger_right: int  # McNemar's discordant pairs
    only_champion_right: int
    p_value: float  # exact McNemar, two-sided
    difference: dict[str, float]  # challenger - champion
    interval: dict[str, tuple[float, float]]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self),
                "interval": {key: list(pair) for key, pair in self.interval.items()}}


def compare(labels, challenger_predicted, champion_predicted, classes: int,
            seed: int = 0) -> Comparison:
    """The paired comparison of two sets of predicted labels of the same images."""
    labels = np.asarray(labels, dtype=np.int64)
    first = np.asarray(challenger_predicted, dtype=np.int64) == labels
    second = np.asarray(champion_predicted, dtype=np.int64) == labels
    only_first, only_second = int(np.sum(first & ~second)), int(np.sum(~first & second))
    figures = {name: {"accuracy": float(np.mean(right)),
                      "macro_recall": macro_recall(labels, right, classes)}
               for name, right in (("challenger", first), ("champion", second))}
    return Comparison(
        images=int(len(labels)), challenger=figures["challenger"], champion=figures["champion"],
        only_challenger_right=only_first, only_champion_right=only_second,
        p_value=mcnemar_exact(only_first, only_second),
        difference={key: figures["challenger"][key] - figures["champion"][key]
                    for key in figures["challenger"]},
        interval=bootstrap_intervals(labels, first, second, classes, seed))


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: under no difference, each discordant image is equally
    likely to favour either model, a binomial test at one half. 1.0 without discordant images."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(only_first, discordant, 0.5).pvalue)


def macro_recall(labels: np.ndarray, right: np.ndarray, classes: int) -> float:
    """The mean over the classes present of the share of their images labelled right."""
    support = np.bincount(labels, minlength=classes)
    hits = np.bincount(labels, weights=right.astype(np.float64), minlength=classes)
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def bootstrap_intervals(labels: np.ndarray, first: np.ndarray, second: np.ndarray, classes: int,
                        seed: int) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the differences (first - second) in accuracy and macro recall
    over BOOTSTRAP_RESAMPLES resamples of the images, the same resample for both models."""
    rng = np.random.default_rng(seed)
    count = len(labels)
    samples = rng.integers(0, count, size=(BOOTSTRAP_RESAMPLES, count))
    accuracy = first[samples].mean(axis=1) - second[samples].mean(axis=1)
    recall = np.array([macro_recall(labels[rows], first[rows], classes)
                       - macro_recall(labels[rows], second[rows], classes) for rows in samples])
    tail = (1 - CONFIDENCE) / 2 * 100
    return {name: tuple(float(bound) for bound in np.percentile(values, [tail, 100 - tail]))
            for name, values in (("accuracy", accuracy), ("macro_recall", recall))}
