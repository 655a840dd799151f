"""CACHE_BUDGET (job/inputs/budget.py): the caches' sizes are known before they are written, and a
phase whose cache would not fit trains online, saying why."""
import json
import shutil

import numpy as np
import pytest

from job.config import Config, ConfigError
from job.inputs.budget import CacheBudget, available_bytes
from tests.conftest import run_in_process, tiny_vgg16_settings, write_class_images
from tests.test_train import cached_features


@pytest.mark.parametrize("text, expected", [
    ("80%", CacheBudget(share=0.8)), ("0", CacheBudget(fixed_bytes=0)),
    ("500MB", CacheBudget(fixed_bytes=500 * 10**6)), ("20GiB", CacheBudget(fixed_bytes=20 * 2**30)),
    ("1.5 gb", CacheBudget(fixed_bytes=1_500_000_000)), ("4096", CacheBudget(fixed_bytes=4096)),
])
def test_cache_budget_is_a_share_of_the_free_space_or_a_size(text, expected):
    assert Config.from_env({"DATA_URI": "data", "CACHE_BUDGET": text}).cache_budget == expected


@pytest.mark.parametrize("text", ["lots", "120%", "-1GB", "5PB"])
def test_a_cache_budget_that_is_neither_fails_naming_the_variable(text):
    with pytest.raises(ConfigError, match=r"^CACHE_BUDGET=.* is not valid: expected a share"):
        Config.from_env({"DATA_URI": "data", "CACHE_BUDGET": text})


def test_a_share_counts_what_the_runs_own_scratch_already_holds(tmp_path):
    (tmp_path / "bottom-train.data").write_bytes(b"x" * 10**6)
    expected = 0.5 * (shutil.disk_usage(tmp_path).free + 10**6)
    assert available_bytes(CacheBudget(share=0.5), tmp_path) == pytest.approx(expected, rel=0.02)
    assert available_bytes(CacheBudget(fixed_bytes=123), tmp_path) == 123


def test_the_estimates_are_the_bytes_the_caches_then_hold(tmp_path):
    features = cached_features(tmp_path, AUGMENT="1", AUGMENT_VIEWS="3", TTA="1")
    plan = features.plan
    assert plan.cached == {"phase1": True, "phase2": True}
    images = sum(len(getattr(features.dataset, name)) for name in ("train", "validation", "test"))
    assert plan.decoded_images_bytes == images * 32 * 32 * 3

    def cached_bytes(head: bool) -> int:
        return sum(x.numpy().nbytes for outputs in features.frozen_outputs(head).values()
                   for x, _ in outputs)

    pooled = cached_bytes(head=True)
    assert plan.phase_bytes["phase1"] == pooled
    assert plan.phase_bytes["phase2"] == pooled + cached_bytes(head=False)


def test_a_phase_whose_cache_does_not_fit_trains_online(tmp_path):
    roomy = cached_features(tmp_path / "roomy").plan
    just_the_head = roomy.decoded_images_bytes + roomy.phase_bytes["phase1"]
    features = cached_features(tmp_path / "tight", available_bytes=just_the_head)
    assert features.plan.cached == {"phase1": True, "phase2": False}
    assert features.for_phase(fine_tunes=False, augmentation_seed=1).cached
    assert not features.for_phase(fine_tunes=True, augmentation_seed=2).cached
    assert "phase2: its cache of the frozen layers' outputs would take" in \
        features.plan.refusals()[0]


def test_a_run_over_its_cache_budget_trains_online_and_records_why(tmp_path):
    images = write_class_images(tmp_path / "images", ["a", "b"], per_class=8)
    result = run_in_process("job", tiny_vgg16_settings(
        images, tmp_path / "out", tmp_path / "cache", CACHE_BUDGET="1KB", HEAD_EPOCHS="1",
        FINE_TUNE_EPOCHS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())
    assert metrics["cache"]["cached"] == {"phase1": False, "phase2": False}
    assert metrics["cache"]["available_bytes"] == 1000
    assert metrics["phase1"]["cached"] is False and metrics["phase2"]["cached"] is False
    assert "over CACHE_BUDGET (1.00 KB: 1.00 KB)" in result.stderr
    assert result.stderr.count("trains online, its frozen layers running every epoch") == 2
    assert np.isfinite(metrics["test"]["accuracy"])
