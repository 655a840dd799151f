"""The paired comparison behind promotion (job/promotion/paired.py): exact McNemar and the paired bootstrap."""
import numpy as np
from scipy import stats

from job.promotion import paired


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_images():
    assert paired.mcnemar_exact(2, 12) == stats.binomtest(2, 14, 0.5).pvalue
    assert paired.mcnemar_exact(0, 0) == 1.0


def test_identical_predictions_differ_by_nothing():
    labels = np.array([0, 1, 1, 0, 2, 2])
    result = paired.compare(labels, labels, labels, classes=3)
    assert result.p_value == 1.0 and result.difference == {"accuracy": 0.0, "macro_recall": 0.0}
    assert result.interval == {"accuracy": (0.0, 0.0), "macro_recall": (0.0, 0.0)}


def test_a_clearly_worse_challenger_has_a_small_p_value_and_an_interval_below_zero():
    labels = np.arange(200) % 2
    champion = labels.copy()
    challenger = labels.copy()
    challenger[:40] = 1 - challenger[:40]  # wrong on 40 images the champion gets right
    result = paired.compare(labels, challenger, champion, classes=2)
    assert (result.only_challenger_right, result.only_champion_right) == (0, 40)
    assert result.p_value < 1e-6
    assert abs(result.difference["accuracy"] + 0.2) < 1e-12
    assert result.interval["accuracy"][1] < 0 and result.interval["macro_recall"][1] < 0


def test_macro_recall_weighs_each_class_alike():
    labels = np.array([0] * 9 + [1])
    right = np.array([True] * 9 + [False])
    assert paired.macro_recall(labels, right, 2) == 0.5
