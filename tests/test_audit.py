"""The data audit (job/inputs/audit.py): duplicates by bytes and by pooled features, likely label issues
by confident learning on out-of-fold probe predictions; and audit.json of a real run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job.inputs import audit
from tests.test_run_page import screenshot

CLASSES = ["cat", "dog"]


def images(splits, labels, digests, features=None) -> audit.Images:
    return audit.Images(list(splits), [f"{split}/{i}.jpg" for i, split in enumerate(splits)],
                        np.asarray(labels), list(digests), features)


def test_exact_duplicates_are_listed_across_splits_within_a_split_and_across_classes():
    found = audit.audit(images(["train", "train", "test", "train", "validation"],
                               [0, 1, 0, 0, 1], ["a", "b", "a", "a", "c"]),
                        CLASSES, None, False, 0, {}, {})
    cross = {(p["a"], p["b"]) for p in found["cross_split_duplicates"]}
    assert cross == {("train/0.jpg", "test/2.jpg"), ("test/2.jpg", "train/3.jpg")}
    assert [(p["a"], p["b"]) for p in found["within_split_duplicates"]] == [
        ("train/0.jpg", "train/3.jpg")]
    assert found["cross_class_duplicates"] == []
    assert found["label_issues"] is None and "exact duplicates only" in found["notes"][0]
    relabelled = audit.audit(images(["train", "train"], [0, 1], ["a", "a"]),
                             CLASSES, None, False, 0, {}, {})
    assert relabelled["cross_class_duplicates"][0]["b_label"] == "dog"


def test_near_duplicates_are_pairs_whose_centred_feature_cosine_reaches_the_threshold():
    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (40, 64)) + 5.0  # an offset, as non-negative pooled features have
    features[39] = features[3] + rng.normal(0, 0.05, 64)  # a slightly altered copy of image 3
    splits = ["train"] * 30 + ["test"] * 10
    pairs = audit.duplicate_pairs(images(splits, [0] * 40, [str(i) for i in range(40)], features))
    assert [(p["a"], p["b"], p["kind"]) for p in pairs] == [("train/3.jpg", "test/39.jpg", "near")]
    assert pairs[0]["similarity"] > 0.99


def test_label_issues_find_misfiled_images_most_likely_first():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 60)
    features = np.eye(3)[labels] * 6 + rng.normal(0, 1, (180, 3))
    given = labels.copy()
    given[[0, 1, 70, 130]] = [1, 2, 0, 0]  # four misfiled
    issues = audit.label_issues(np.hstack([features, rng.normal(0, 1, (180, 5))]), given, 1.0,
                                False, seed=0)
    flagged = [issue["index"] for issue in issues]
    assert {0, 1, 70, 130} <= set(flagged[:6])
    assert issues[flagged.index(70)]["suggested"] == 1
    assert [issue["score"] for issue in issues] == sorted((i["score"] for i in issues), reverse=True)


def test_label_issues_fit_their_folds_on_one_blas_thread(monkeypatch, two_blas_threads):
    """A second OpenBLAS thread spins between lbfgs's small products: 15x the CPU on 2 loaded cores."""
    from threadpoolctl import threadpool_info

    seen = []

    def recording(*args, **kwargs):
        seen.append([pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"])
        return cross_val_predict(*args, **kwargs)

    cross_val_predict = audit.cross_val_predict
    monkeypatch.setattr(audit, "cross_val_predict", recording)
    rng = np.random.default_rng(2)
    audit.label_issues(rng.normal(0, 1, (40, 4)), np.repeat([0, 1], 20), 1.0, False, seed=0)
    assert seen and all(threads == 1 for threads in seen[0])


def test_dropping_cross_split_duplicates_leaves_the_exact_leaks_out_of_training(
        xray_with_leaks_and_misfiled, caplog):
    from job.inputs import data

    dataset = data.load_dataset(xray_with_leaks_and_misfiled["root"], 96, 0.2, 0.1, seed=42)
    with caplog.at_level("INFO", logger="job"):
        kept, dropped = audit.drop_cross_split_duplicates(dataset, strategy=None)
    assert sorted((entry["path"], entry["same_bytes_as"]) for entry in dropped) == sorted(
        xray_with_leaks_and_misfiled["leaks"])
    assert len(kept.train) == len(dataset.train) - len(dropped)
    assert not any(Path(path).name.startswith("leak") for path in kept.train.paths)
    assert (kept.validation, kept.test) == (dataset.validation, dataset.test)
    lines = [record.getMessage() for record in caplog.records if "DROP_CROSS" in record.getMessage()]
    assert lines == [f"audit: DROP_CROSS_SPLIT_DUPLICATES=1: {len(dropped)} training image(s) "
                     "dropped, their bytes those of a validation or test image (listed in "
                     "audit.json)"]


def test_a_real_runs_audit_lists_the_leaks_and_the_misfiled_images(audited_run):
    result = audited_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = audited_run["run_dir"]
    found = json.loads((run_dir / audit.FILE).read_text())
    pairs = {frozenset((p["a"], p["b"])) for p in found["cross_split_duplicates"]}
    assert {frozenset(leak) for leak in audited_run["leaks"]} <= pairs
    flagged = {issue["path"]: issue for issue in found["label_issues"]}
    caught = [path for path in audited_run["misfiled"] if path in flagged]
    assert len(caught) >= 3, (caught, found["label_issues"][:10])
    assert all(flagged[path]["suggested_label"] == "NORMAL" for path in caught)
    assert audit.FILE in json.loads((run_dir / "MANIFEST.json").read_text())["files"]
    lines = [line for line in result.stderr.splitlines() if "INFO job: audit: " in line]
    assert len(lines) == 1 and "cross-split duplicates (leaks: " in lines[0]


def test_a_run_that_keeps_its_leaks_says_the_audit_removed_nothing_naming_the_setting(audited_run):
    line = next(line for line in audited_run["result"].stderr.splitlines()
                if "INFO job: audit: " in line)
    assert "removed nothing (DROP_CROSS_SPLIT_DUPLICATES=1 drops the exact leaks" in line
    found = json.loads((audited_run["run_dir"] / audit.FILE).read_text())
    assert found["dropped_from_training"] is None


def test_a_real_runs_report_shows_the_leaks_and_label_issues(audited_run):
    page = (audited_run["run_dir"] / "report.html").read_text()
    section = page.split('<section id="audit">')[1].split("</section>")[0]
    assert all(test_path in section for _, test_path in audited_run["leaks"])
    assert "filed <b>PNEUMONIA</b>, likely <span" in section
    assert section.count("data:image/jpeg;base64,") >= 2 * 3 + 3  # three leaks (pairs), issues


def test_a_real_run_is_calibrated_and_its_ece_measured(audited_run):
    metrics = json.loads((audited_run["run_dir"] / "metrics.json").read_text())
    block = metrics["calibration"]
    assert 0.05 < block["temperature"] < 20 and "skipped" not in block
    for key in ("test_ece_before", "test_ece_after", "validation_ece_before",
                "validation_ece_after"):
        assert 0 <= block[key] <= 1
    assert block["validation_ece_after"] <= block["validation_ece_before"] + 0.02
    assert metrics["record"]["decision_threshold"] == metrics["decision_threshold"]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not on PATH: `make browser` installs Debian's chromium")
def test_a_real_runs_data_audit_renders_in_headless_chromium(audited_run, tmp_path):
    page_path = audited_run["run_dir"] / "report.html"
    # The page cut to its Data audit section, so that the screenshot shows it.
    page = page_path.read_text()
    head, rest = page.split("<section", 1)
    audit_only = tmp_path / "audit.html"
    audit_only.write_text(head + '<section id="audit">' +
                          rest.split('<section id="audit">')[1].split("</section>")[0] +
                          "</section></body></html>")
    png = tmp_path / "audit.png"
    result = screenshot(audit_only, png, tmp_path)
    assert result.returncode == 0 and png.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 64, "the screenshot looks blank"
