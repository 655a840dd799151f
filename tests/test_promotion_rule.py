"""The promotion rule (job/promotion/promote.py `decide`) on paired comparisons made up in-process."""
import numpy as np

from job.promotion import paired, promote


def comparison(champion_only: int, challenger_only: int, images: int = 600):
    """Both models right on the same images but for the discordant ones given."""
    labels = np.arange(images) % 2
    champion, challenger = labels.copy(), labels.copy()
    challenger[:champion_only] = 1 - labels[:champion_only]
    champion[champion_only:champion_only + challenger_only] = \
        1 - labels[champion_only:champion_only + challenger_only]
    return paired.compare(labels, challenger, champion, classes=2)


def test_a_difference_within_the_noise_promotes():
    verdict = promote.decide(comparison(champion_only=8, challenger_only=4), max_drop=0.01)
    assert verdict["promoted"] and "no significant drop" in verdict["reason"]


def test_a_significant_drop_no_larger_than_the_max_drop_promotes():
    verdict = promote.decide(comparison(champion_only=30, challenger_only=6, images=4000),
                             max_drop=0.01)  # 0.6 points, p < 0.001
    assert verdict["promoted"]


def test_a_significant_drop_larger_than_the_max_drop_holds_back_naming_its_figures():
    verdict = promote.decide(comparison(champion_only=40, challenger_only=5), max_drop=0.01)
    assert not verdict["promoted"] and verdict["status"] == "held_back"
    assert "McNemar p=" in verdict["reason"] and "PROMOTE_MAX_DROP 0.01" in verdict["reason"]


def test_a_large_drop_that_is_not_significant_promotes():
    verdict = promote.decide(comparison(champion_only=3, challenger_only=0, images=60),
                             max_drop=0.01)  # 5 points on 60 images, p = 0.25
    assert verdict["promoted"]


def test_class_changes_are_named():
    assert promote.class_change(["a", "b"], ["a", "b", "c"]) == "added ['c']"
    assert promote.class_change(["a", "b"], ["a", "x"]) == "added ['x'], removed ['b']"
