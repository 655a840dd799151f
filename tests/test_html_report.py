"""report.html: the sections of a run's self-contained page, on synthetic inputs and, in headless
Chromium, on a real run exported by the job."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from job.results import html_images, html_report, report

TWO = ["NORMAL", "PNEUMONIA"]
TEN = [f"class{i}" for i in range(10)]


def section(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def write_images(root, count: int) -> list[str]:
    """count small distinct RGB images under root/test/; their absolute paths."""
    paths = []
    for index in range(count):
        path = root / "test" / f"img{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (200, 120), (index * 9 % 256, 80, 160)).save(path)
        paths.append(str(path))
    return paths


def run_metrics(class_names, labels, probabilities, **extra) -> dict:
    """The parts of metrics.json the page reads, scored by job.results.report as a run scores them."""
    scored = report.score_splits({"test": labels}, {"test": probabilities}, class_names)
    history = {"loss": [0.9, 0.6, 0.5], "val_loss": [1.0, 0.7, 0.65],
               "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.45, 0.6, 0.7]}
    return {"run_id": "synthetic", "classes": class_names, "config": {"backbone": "vgg16"},
            "class_counts": {split: dict.fromkeys(class_names, 3)
                             for split in ("train", "validation", "test")},
            "skipped_files": {}, "data_notes": ["a note"],
            "phase1": {"history": history, "epochs_run": 3, "seconds": 1.5},
            "phase2": {"history": history, "epochs_run": 3, "seconds": 2.5},
            "validation": scored["validation"], "test": scored["test"],
            "decision_threshold": scored["decision_threshold"], **extra}


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """Twelve test images of two classes; four wrong at 0.5, with known confidences."""
    tmp_path = tmp_path_factory.mktemp("binary")
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    scores = np.array([.1, .2, .3, .97, .7, .15, .8, .9, .85, .6, .05, .2])
    probabilities = scores[:, None].astype(np.float32)
    paths = write_images(tmp_path, len(labels))
    predictions = html_report.TestPredictions.of_split(paths, labels, probabilities, tmp_path)
    return run_metrics(TWO, labels, probabilities), predictions


@pytest.fixture(scope="module")
def binary_page(binary) -> str:
    """The page of the binary run, not exported (rendered once: each plot takes a while)."""
    return html_report.render(binary[0], TWO, binary[1])


def test_every_section_is_present_and_every_image_embedded(binary_page):
    page = binary_page
    for section_id in html_report.SECTIONS:
        section(page, section_id)
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(sources) >= 2 + 2 + 1 + 4  # curves, two confusion matrices, ROC/PR, thumbnails
    assert all(source.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
               for source in sources)
    assert not re.search(r"<(script|link)\b|https?://|url\(", page)  # nothing fetched
    for source in sources:  # each decodes to an image
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()


def test_text_from_the_data_is_escaped(tmp_path):
    classes = ["<b>cat</b>", "dog & co"]
    labels, probabilities = np.array([0, 1, 0, 1]), np.array([[.9], [.2], [.1], [.8]])
    metrics = run_metrics(classes, labels, probabilities, run_id='r"<1>',
                          skipped_files={"<img src=x onerror=alert(1)>.jpg": "not an <image>"})
    paths = write_images(tmp_path, 4)
    page = html_report.render(metrics, classes,
                              html_report.TestPredictions.of_split(paths, labels, probabilities,
                                                                   tmp_path))
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    assert "dog &amp; co" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.jpg" in page
    assert "not an &lt;image&gt;" in page and "r&quot;&lt;1&gt;" in page


def test_the_evaluation_warnings_are_shown_under_the_headline():
    labels, probabilities = np.array([0, 1]), np.array([[.1], [.9]])
    metrics = run_metrics(TWO, labels, probabilities,
                          evaluation_warnings=["decision threshold 0.5, not chosen on validation"])
    page = html_report.render(metrics, TWO, None)
    headline_end = page.index("</table>")
    assert page.index("Evaluation: decision threshold 0.5, not chosen on validation") > headline_end
    assert page.index("Evaluation: decision threshold 0.5") < page.index('id="data"')


def test_two_classes_get_roc_and_pr_curves_and_both_operating_points(binary_page):
    page = binary_page
    assert section(page, "roc-pr").count("<img") == 1
    per_class = section(page, "per-class")
    assert "at 0.5" in per_class and "at the decision threshold 0.500" in per_class
    assert "PNEUMONIA" in per_class and "macro" in per_class
    assert section(page, "confusion").count("<img") == 2


def test_ten_classes_omit_roc_and_pr_and_say_so():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 10
    probabilities = rng.dirichlet(np.ones(10), size=40)
    metrics = run_metrics(TEN, labels, probabilities)
    predictions = html_report.TestPredictions(labels, probabilities, [f"{i}.png" for i in range(40)])
    page = html_report.render(metrics, TEN, predictions)
    roc_pr = section(page, "roc-pr")
    assert "<img" not in roc_pr and "Omitted" in roc_pr and "this run has 10" in roc_pr
    assert section(page, "confusion").count("<img") == 1  # argmax only: no threshold
    assert "(image not available)" in section(page, "mistakes")  # no root: no images at hand


def test_contact_sheet_lists_the_most_confident_mistakes_first(binary, binary_page):
    predictions = binary[1]
    # Wrong at 0.5: img03 (PNEUMONIA at 0.97), img10 (NORMAL at 0.95), img11 (NORMAL at 0.8),
    # img04 (PNEUMONIA at 0.7).
    wrong = html_report.most_confident_mistakes(predictions.labels, predictions.probabilities, 0.5)
    assert [index for index, *_ in wrong] == [3, 10, 11, 4]
    assert wrong[0][1:] == (0, 1, pytest.approx(0.97))
    assert wrong[1][1:] == (1, 0, pytest.approx(0.95))
    sheet = section(binary_page, "mistakes")
    names = re.findall(r'<span class="note">(test/img\d+\.png)</span>', sheet)
    assert names == ["test/img03.png", "test/img10.png", "test/img11.png", "test/img04.png"]
    assert "4 of 12 test images are wrong (at the decision threshold 0.500)" in sheet
    first = re.search(r'src="data:image/jpeg;base64,([^"]+)"', sheet).group(1)
    thumbnail = Image.open(io.BytesIO(base64.b64decode(first)))
    assert max(thumbnail.size) == html_images.THUMBNAIL_PIXELS  # 200 x 120 shrunk to 96 x 58


def test_export_section_says_not_exported_until_there_is_a_report(binary_page):
    assert "Not exported yet" in section(binary_page, "export")
    export = {"status": "failed", "failed_gates": ["int8: top-1 agreement 95.00% < 99%"],
              "parity": {"reference": "tensorflow", "images": 12,
                         "accuracy": {"tensorflow": 0.75, "onnx_int8": 0.7},
                         "int8": {"max_abs_diff": 0.02, "top1_agreement": 0.95}},
              "sizes_bytes": {"model.onnx": 4_100_000, "model.int8.onnx": 1_330_000},
              "latency": {"onnx_int8": {"batch1_p50_ms": 2.7, "batch32_images_per_s": 477.0}}}
    text = html_report.export_section(export)
    assert "Not exported yet" not in text and "failed" in text
    assert "int8: top-1 agreement 95.00% &lt; 99%" in text
    for figure in ("4,100,000", "1,330,000", "batch1_p50_ms", "2.7", "477", "0.95", "onnx_int8"):
        assert figure in text


def test_predictions_round_trip_with_paths_relative_to_the_data_root(binary, tmp_path):
    _, predictions = binary
    html_report.write_predictions(tmp_path / "p.json", predictions)
    stored = json.loads((tmp_path / "p.json").read_text())
    assert stored["paths"][0] == "test/img00.png"
    moved = html_report.read_predictions(tmp_path / "p.json", tmp_path / "elsewhere")
    np.testing.assert_array_equal(moved.labels, predictions.labels)
    np.testing.assert_array_equal(moved.probabilities, predictions.probabilities)
    assert moved.image_paths()[0] == tmp_path / "elsewhere" / "test" / "img00.png"
    assert html_report.read_predictions(tmp_path / "absent.json", tmp_path) is None


def screenshot(page_path, png_path, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png_path}",
         "--window-size=1200,3000", page_path.as_uri()],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not on PATH: `make browser` installs Debian's chromium")
def test_a_real_runs_report_renders_in_headless_chromium(vgg16_exported_by_job, tmp_path):
    run_dir = vgg16_exported_by_job  # real X-rays, trained and exported by `python -m job`
    page_path = run_dir / "export_report.html"  # the run's page, rendered again by the export
    page = page_path.read_text()
    for section_id in html_report.SECTIONS:
        section(page, section_id)
    manifest = json.loads((run_dir / report.MANIFEST).read_text())["files"]
    assert {html_report.REPORT, html_report.PREDICTIONS} <= set(manifest)
    assert "Not exported yet" not in section(page, "export")
    assert "Not exported yet" in section((run_dir / html_report.REPORT).read_text(), "export")
    assert "onnx_int8" in section(page, "export")
    # The stored probabilities are the ones metrics.json scored.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stored = html_report.read_predictions(run_dir / html_report.PREDICTIONS, None)
    predicted = (stored.probabilities[:, 0] >= 0.5).astype(int)
    confusion = np.zeros((2, 2), int)
    np.add.at(confusion, (stored.labels, predicted), 1)
    assert confusion.tolist() == metrics["test"]["confusion_matrix"]
    assert section(page, "mistakes").count("data:image/jpeg;base64,") >= 1
    png = tmp_path / "report.png"
    result = screenshot(page_path, png, tmp_path)
    assert result.returncode == 0 and png.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 64, "the screenshot looks blank"
    assert (pixels[:1500] < 250).mean() > 0.02  # ink in the top half: headings, tables, plots


def test_promotion_section_shows_the_verdict_figures_and_recall_per_class_side_by_side(binary_page):
    assert "PROMOTE_URI was not set" in section(binary_page, "promotion")
    promotion = {"promoted": False, "status": "held_back", "int8": "not exported",
                 "reason": "test accuracy dropped 0.2733 (0.7733 to 0.5000)",
                 "champion": {"run_id": "nightly-41", "version": "versions/nightly-41"},
                 "comparison": {"images": 300, "challenger": {"accuracy": 0.5, "macro_recall": 0.5},
                                "champion": {"accuracy": 0.7733, "macro_recall": 0.7733},
                                "difference": {"accuracy": -0.2733, "macro_recall": -0.2733},
                                "interval": {"accuracy": [-0.34, -0.21],
                                             "macro_recall": [-0.34, -0.21]},
                                "only_challenger_right": 60, "only_champion_right": 142,
                                "p_value": 7.57e-09},
                 "per_class_recall": {"challenger": {"NORMAL": 0.0, "PNEUMONIA": 1.0},
                                      "champion": {"NORMAL": 0.61, "PNEUMONIA": 0.93}}}
    text = html_report.promotion_section(promotion)
    for figure in ("held back", "nightly-41", "0.7733", "-0.2733", "-0.3400 to -0.2100", "142",
                   "7.57e-09", "NORMAL", "0.61", "0.93"):
        assert figure in text, figure


def test_the_calibration_section_shows_the_temperature_ece_and_reliability_diagrams(binary):
    from job.training import calibration

    labels, probabilities = binary[1].labels, binary[1].probabilities
    bins = calibration.reliability(labels, probabilities)
    block = {"temperature": 1.7, "ece_bins": 15, "ece_definition": "top-label, equal-width bins",
             "test_ece_before": 0.21, "test_ece_after": 0.05,
             "reliability": {"test": {"before": bins, "after": bins}}}
    page = html_report.render({**binary[0], "calibration": block}, TWO, binary[1])
    body = section(page, "calibration")
    assert "Temperature 1.7" in body and "0.21" in body and "0.05" in body
    assert 'alt="reliability diagrams before and after calibration"' in body
    skipped = html_report.render({**binary[0], "calibration": {"temperature": 1.0,
                                                               "skipped": "too few"}}, TWO, None)
    assert "Skipped, temperature 1: too few" in section(skipped, "calibration")


def test_the_audit_section_shows_counts_and_thumbnails_of_leaks_and_label_issues(binary):
    metrics, predictions = binary
    pair = {"kind": "exact", "similarity": 1.0, "a": "test/img00.png", "a_split": "test",
            "a_label": "NORMAL", "b": "test/img01.png", "b_split": "train", "b_label": "NORMAL"}
    issue = {"path": "test/img02.png", "given_label": "PNEUMONIA", "suggested_label": "NORMAL",
             "score": 0.97}
    audited = {"counts": {"cross_split_duplicates": 1, "within_split_duplicates": 0,
                          "cross_class_duplicates": 0, "label_issues": 1},
               "notes": [], "cross_split_duplicates": [pair], "label_issues": [issue]}
    body = section(html_report.render({**metrics, "data_audit": audited}, TWO, predictions),
                   "audit")
    assert "cross split duplicates" in body and "test/img01.png" in body
    assert "filed <b>PNEUMONIA</b>, likely" in body and "(0.970)" in body
    assert body.count("data:image/jpeg;base64,") == 3  # both images of the pair, the issue's
    assert "No data audit" in section(html_report.render(metrics, TWO, predictions), "audit")
