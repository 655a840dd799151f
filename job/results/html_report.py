"""HTML report: report.html, one self-contained page per run, and test_predictions.json.

The page (issue #17) holds the data (classes, counts per split, skipped files and why), the
training curves of both phases, the confusion matrix, ROC and precision-recall curves with the
decision threshold marked (two classes), per-class precision/recall/F1, a contact sheet of the
test images the model got most confidently wrong, and the export report once there is one. Every
plot and thumbnail is embedded as a data URI and the style is inline, so the file opens alone,
from a bucket or a laptop (the plots and thumbnails: job/results/html_images.py). `render` is pure
apart from reading the thumbnails' images.

The scores shown are metrics.json's (the same numbers, not recomputed); the curves and the contact
sheet need the final phase's probabilities on the test split, which metrics.json does not keep.
They live in test_predictions.json beside it (labels, probabilities, image paths relative to the
data root; one probability per image, or one per image and class), so the export can render the page again, with its
report added, without the model or TensorFlow.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from edge.runtime import predict_labels
from job.results import html_images, report
from job.results.html_images import escaped

REPORT = "report.html"
PREDICTIONS = "test_predictions.json"
MISTAKES_SHOWN = 24  # thumbnails on the contact sheet
SKIPPED_SHOWN = 200  # rows of the skipped-files table; metrics.json lists them all
SECTIONS = ("data", "audit", "curves", "calibration", "confusion", "roc-pr", "per-class", "mistakes",
            "export", "promotion")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1150px;padding:0 1em;color:#1c1c1c;background:#fff}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f3f7}
img.plot{max-width:100%;border:1px solid #eee}.note{color:#555}
.sheet{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:150px;font-size:.75em;border:1px solid #ddd;padding:.3em;background:#fafafa}
figure img{display:block;margin:0 auto .3em}figcaption{overflow-wrap:anywhere}
.wrong{color:#b00020;font-weight:600}.passed{color:#1b7a2b;font-weight:600}
"""


@dataclasses.dataclass(frozen=True)
class TestPredictions:
    """The final phase's probabilities on the test split (the ones scored: with TTA, the mean of
    each image and its flip), its labels, and its images' paths relative to root."""

    labels: np.ndarray  # (images,) int
    probabilities: np.ndarray  # (images, 1): class 1's probability, two classes; else (images, classes)
    paths: list[str]
    root: Path | None = None  # where paths resolve; None: the images are not at hand

    @classmethod
    def of_split(cls, paths: list[str], labels, probabilities, root: Path) -> "TestPredictions":
        """From a split's absolute paths (kept absolute where they are not under root)."""
        relative = [_relative(Path(path), Path(root)) for path in paths]
        return cls(np.asarray(labels, dtype=np.int64), np.asarray(probabilities), relative, root)

    def image_paths(self) -> list[Path | None]:
        return [Path(self.root, path) if self.root else None for path in self.paths]


def write_predictions(path: Path, predictions: TestPredictions) -> None:
    report.write_json(path, {"labels": predictions.labels.tolist(),
                             "probabilities": predictions.probabilities.astype(float).tolist(),
                             "paths": predictions.paths})


def read_predictions(path: Path, root: Path | None) -> TestPredictions | None:
    """test_predictions.json, its paths resolved under root; None where the run has none."""
    if not Path(path).exists():
        return None
    stored = json.loads(Path(path).read_text())
    return TestPredictions(np.asarray(stored["labels"], dtype=np.int64),
                           np.asarray(stored["probabilities"], dtype=np.float64),
                           stored["paths"], root)


def write_report(path: Path, metrics: dict, predictions: TestPredictions | None,
                 export_report: dict | None = None, promotion: dict | None = None) -> None:
    """Renders report.html to path (through a temporary file, so no reader sees half of it)."""
    report.write_text(path, render(metrics, metrics["classes"], predictions, export_report,
                                   promotion))


def render(metrics: dict, class_names: list[str], predictions: TestPredictions | None,
           export_report: dict | None = None, promotion: dict | None = None) -> str:
    """The whole page, as one HTML string."""
    threshold = metrics.get("decision_threshold", 0.5)
    sections = [
        _section("data", "Data", data_section(metrics, class_names)),
        _section("audit", "Data audit",
                 audit_section(metrics, predictions.root if predictions else None)),
        _section("curves", "Training curves", curves_section(metrics)),
        _section("calibration", "Calibration", calibration_section(metrics)),
        _section("confusion", "Confusion matrix (test)", confusion_section(metrics, class_names)),
        _section("roc-pr", "ROC and precision-recall (test)",
                 roc_pr_section(class_names, predictions, threshold)),
        _section("per-class", "Per-class precision, recall, F1 (test)",
                 per_class_section(metrics)),
        _section("mistakes", "Most confident mistakes (test)",
                 mistakes_section(class_names, predictions, threshold)),
        _section("export", "Export", export_section(export_report)),
        _section("promotion", "Promotion", promotion_section(promotion)),
    ]
    title = f"Run {metrics.get('run_id', '')}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escaped(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escaped(title)}</h1>{headline(metrics)}{evaluation_warnings(metrics)}"
            f"{''.join(sections)}</body></html>\n")


def headline(metrics: dict) -> str:
    config, test = metrics.get("config") or {}, metrics.get("test") or {}
    rows = [("backbone", config.get("backbone")), ("image size", config.get("image_size")),
            ("precision policy", metrics.get("precision_policy")),
            ("test accuracy (at 0.5)", test.get("accuracy")),
            ("test accuracy at the decision threshold",
             (test.get("at_decision_threshold") or {}).get("accuracy")),
            ("test ROC AUC", test.get("roc_auc")),
            ("test macro recall", test.get("macro_recall")),
            ("decision threshold", metrics.get("decision_threshold"))]
    return _table(["", "value"], [row for row in rows if row[1] is not None])


def evaluation_warnings(metrics: dict) -> str:
    """Under the headline, why some of its figures are less than they seem (job.results.report)."""
    return "".join(f'<p class="wrong">Evaluation: {escaped(warning)}</p>'
                   for warning in metrics.get("evaluation_warnings") or [])


def data_section(metrics: dict, class_names: list[str]) -> str:
    counts = metrics.get("class_counts") or {}
    splits = list(counts)
    rows = [[name, *(counts[split].get(name, 0) for split in splits)] for name in class_names]
    rows.append(["total", *(sum(counts[split].values()) for split in splits)])
    body = _table(["class", *splits], rows)
    body += "".join(f'<p class="note">{escaped(note)}</p>'
                    for note in metrics.get("data_notes") or [])
    skipped = metrics.get("skipped_files") or {}
    body += f"<h3>Skipped files: {len(skipped)}</h3>"
    if skipped:
        body += _table(["file", "reason"], list(skipped.items())[:SKIPPED_SHOWN])
    if len(skipped) > SKIPPED_SHOWN:
        body += _note(f"and {len(skipped) - SKIPPED_SHOWN} more, listed in metrics.json")
    return body


def audit_section(metrics: dict, root: Path | None) -> str:
    """audit.json's counts and thumbnails of the leaks and the likeliest label issues (job.inputs.audit;
    images under root, the data root, when at hand)."""
    audited = metrics.get("data_audit")
    if not audited:
        return _note("No data audit recorded for this run.")
    counts = audited["counts"]
    body = _table(["finding", "count"], [[name.replace("_", " "), "not sought" if count is None
                                          else count] for name, count in counts.items()])
    body += "".join(_note(note) for note in audited.get("notes") or [])
    image = (lambda path: Path(root, path)) if root else (lambda path: None)
    leaks = [html_images.pair_figure(image(pair["a"]), image(pair["b"]), pair)
             for pair in audited["cross_split_duplicates"]]
    if leaks:
        body += (_note(f"Cross-split duplicates (leaks), most alike first: the first "
                       f"{len(leaks)} of {counts['cross_split_duplicates']}; all in audit.json.")
                 + f'<div class="sheet">{"".join(leaks)}</div>')
    issues = [html_images.thumbnail_figure(image(issue["path"]), issue["path"],
                                           issue["given_label"], issue["suggested_label"],
                                           issue["score"], ("filed", "likely"))
              for issue in audited["label_issues"]]
    if issues:
        body += (_note(f"Likely label issues, most likely first (the folder's label, the label "
                       f"suggested, and 1 - p(folder's label) out of fold): the first "
                       f"{len(issues)} of {counts['label_issues']}.")
                 + f'<div class="sheet">{"".join(issues)}</div>')
    return body


def curves_section(metrics: dict) -> str:
    parts = []
    for phase in ("phase1", "phase2"):
        record = metrics.get(phase)
        if not record:
            parts.append(_note(f"{phase.replace('phase', 'phase ')}: not run"))
            continue
        if record.get("probe"):
            probe = record["probe"]
            parts.append(_note(f"phase 1: a linear probe, solved (no epochs): C={probe['C']:g}, "
                               f"validation accuracy {probe['validation_accuracy']}, "
                               f"{record.get('seconds')} s"))
            continue
        buffer = io.BytesIO()
        report.plot_history(record["history"], phase.replace("phase", "phase "), buffer)
        parts.append(html_images.png_image(buffer.getvalue(),
                                           f"{phase} accuracy and loss per epoch"))
        epochs = record.get("epochs_run")
        parts.append(_note(f"{epochs} epoch{'' if epochs == 1 else 's'}, {record.get('seconds')} s"))
    return "".join(parts)


def calibration_section(metrics: dict) -> str:
    """The temperature, ECE before and after, and the test split's reliability diagrams."""
    block = metrics.get("calibration")
    if not block:
        return _note("Not calibrated (a run from before calibration).")
    if block.get("skipped"):
        return _note(f"Skipped, temperature 1: {block['skipped']}.")
    splits = [name for name in report.SCORED_SPLITS if f"{name}_ece_before" in block]
    body = _note(f"Temperature {block['temperature']:g}, fitted on validation by log loss and "
                 f"folded into the output layer: every probability here and in the exported "
                 f"models is calibrated. ECE: {block.get('ece_definition')}, "
                 f"{block.get('ece_bins')} bins.")
    body += _table(["split", "ECE before", "ECE after"],
                   [[name, block[f"{name}_ece_before"], block[f"{name}_ece_after"]]
                    for name in splits])
    diagram = (block.get("reliability") or {}).get("test")
    return body + (html_images.reliability_plot(diagram) if diagram else "")


def confusion_section(metrics: dict, class_names: list[str]) -> str:
    """The test confusion matrix at 0.5 and, for two classes, at the decision threshold."""
    test = metrics.get("test")
    if not test:
        return _note("no test split: nothing scored")
    return "".join(html_images.confusion_plot(np.asarray(scores["confusion_matrix"]), class_names,
                                              caption)
                   for caption, scores in operating_points(test, len(class_names)))


def operating_points(test: dict, classes: int) -> list[tuple[str, dict]]:
    """(caption, scores) of the test split as metrics.json scores it: at 0.5 (argmax with more
    than two classes) and, for two classes, at the decision threshold too."""
    points = [("at 0.5" if classes == 2 else "argmax", test)]
    if test.get("at_decision_threshold"):
        at = test["at_decision_threshold"]
        points.append((f"at the decision threshold {at['threshold']:.3f}", at))
    return points


def roc_pr_section(class_names: list[str], predictions: TestPredictions | None,
                   threshold: float) -> str:
    if len(class_names) != 2:
        return _note(f"Omitted: ROC and precision-recall curves are drawn for two classes; this "
                     f"run has {len(class_names)}.")
    if predictions is None or len(set(predictions.labels.tolist())) < 2:
        return _note("Omitted: no test predictions of both classes recorded for this run.")
    return html_images.roc_pr_plot(predictions.labels, predictions.probabilities[:, -1],
                                   threshold, class_names[1])


def per_class_section(metrics: dict) -> str:
    test = metrics.get("test")
    if not test:
        return _note("no test split: nothing scored")
    cases = operating_points(test, len(metrics.get("classes") or []))
    body = ""
    for caption, scores in cases:
        rows = [[name, f["precision"], f["recall"], f["f1"], f["support"]]
                for name, f in scores["per_class"].items()]
        rows.append(["macro", None, scores.get("macro_recall"), scores.get("macro_f1"), None])
        body += f"<h3>{escaped(caption) if len(cases) > 1 else ''}</h3>"
        body += _table(["class", "precision", "recall", "F1", "support"], rows)
    return body


def mistakes_section(class_names: list[str], predictions: TestPredictions | None,
                     threshold: float) -> str:
    if predictions is None:
        return _note("No test predictions recorded for this run.")
    wrong = most_confident_mistakes(predictions.labels, predictions.probabilities, threshold)
    if not len(wrong):
        return _note(f"None: every one of the {len(predictions.labels)} test images is right.")
    paths = predictions.image_paths()
    figures = [html_images.thumbnail_figure(paths[i], predictions.paths[i], class_names[truth],
                                            class_names[guess], confidence)
               for i, truth, guess, confidence in wrong[:MISTAKES_SHOWN]]
    rule = f"at the decision threshold {threshold:.3f}" if len(class_names) == 2 else "argmax"
    return (_note(f"{len(wrong)} of {len(predictions.labels)} test images are wrong ({rule}); "
                  f"the {len(figures)} most confident mistakes, most confident first (probability "
                  f"of the predicted class):") + f'<div class="sheet">{"".join(figures)}</div>')


def most_confident_mistakes(labels: np.ndarray, probabilities: np.ndarray,
                            threshold: float) -> list[tuple[int, int, int, float]]:
    """(index, true label, predicted label, probability of the predicted class) of every wrong
    prediction, under the run's decision rule, the most confident first."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = predict_labels(probabilities, threshold)
    if probabilities.shape[-1] == 1:  # two classes: class 1's probability
        confidence = np.where(predicted == 1, probabilities[:, 0], 1 - probabilities[:, 0])
    else:
        confidence = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != np.asarray(labels))
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return [(int(i), int(labels[i]), int(predicted[i]), float(confidence[i])) for i in wrong]


def export_section(export_report: dict | None) -> str:
    if not export_report:
        return _note("Not exported yet: `python -m export` (RUN_URI=this run) writes this page "
                     "again with its report here, as export_report.html.")
    status = export_report.get("status", "?")
    body = f'<p>Status: <span class="{"passed" if status == "passed" else "wrong"}">' \
           f"{escaped(status)}</span></p>"
    body += "".join(f'<p class="wrong">{escaped(failure)}</p>'
                    for failure in export_report.get("failed_gates") or [])
    parity = export_report.get("parity") or {}
    tables = [("Parity with the reference "
               f"({parity.get('reference', '?')}, {parity.get('images', '?')} test images)",
               {key: value for key, value in parity.items()
                if isinstance(value, dict) and key != "accuracy"}),
              ("Accuracy on those images", {"accuracy": parity.get("accuracy") or {}}),
              ("Sizes (bytes)", {"bytes": export_report.get("sizes_bytes") or {}}),
              ("Latency per backend", export_report.get("latency") or {})]
    for caption, rows in tables:
        body += f"<h3>{escaped(caption)}</h3>" + _dict_table(rows)
    return body


def promotion_section(promotion: dict | None) -> str:
    """promotion.json's verdict and figures: both models on the same test images, the paired
    test, and per-class recall side by side (docs/promotion.md)."""
    if not promotion:
        return _note("No promotion: PROMOTE_URI was not set for this run.")
    status = "promoted" if promotion.get("promoted") else "held back"
    body = (f'<p>Verdict: <span class="{"passed" if promotion.get("promoted") else "wrong"}">'
            f"{status}</span>. {escaped(promotion.get('reason', ''))}</p>"
            f"<p>int8: {escaped(promotion.get('int8', ''))}</p>")
    champion = promotion.get("champion") or {}
    comparison = promotion.get("comparison")
    if not comparison:
        return body + _note(f"Champion: {champion.get('run_id') or 'none'}; no paired comparison.")
    body += _table(["", "this run", f"champion {champion.get('run_id', '')}", "difference",
                    "95 % interval"],
                   [[metric.replace("_", " "), comparison["challenger"][metric],
                     comparison["champion"][metric], comparison["difference"][metric],
                     " to ".join(f"{bound:.4f}" for bound in comparison["interval"][metric])]
                    for metric in ("accuracy", "macro_recall")])
    body += (f"<p>{comparison['images']:,} test images; right only by this run "
             f"{comparison['only_challenger_right']:,}, only by the champion "
             f"{comparison['only_champion_right']:,}; exact McNemar p = "
             f"{comparison['p_value']:.4g}</p>")
    recalls = promotion.get("per_class_recall") or {}
    if recalls:
        body += "<h3>Recall per class</h3>" + _table(
            ["class", "this run", "champion"],
            [[name, value, recalls["champion"].get(name)]
             for name, value in recalls["challenger"].items()])
    return body


def _dict_table(rows: dict[str, dict]) -> str:
    """A table of dicts: one row per key, one column per key of the dicts."""
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    return _table(["", *columns], [[name, *(row.get(c) for c in columns)]
                                   for name, row in rows.items()])


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{escaped(title)}</h2>{body}</section>'


def _table(headers: list[str], rows: list) -> str:
    head = "".join(f"<th>{escaped(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(value)}</td>" for value in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return escaped(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _note(text: str) -> str:
    return f'<p class="note">{escaped(text)}</p>'


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
