"""Promote: after a run (and its export), it replaces the production model only when no worse.

The champion is the version PROMOTE_URI/CURRENT.json names (job/promotion/versions.py). It is scored on
this run's test split: the images this run decoded once (its tf.data cache in the scratch
folder; read back, not decoded again), resized to the champion's own image size where it differs
and fed to its SavedModel, whose preprocessing is inside it. Both models' labels of the same
images are compared by job/promotion/paired.py, and `decide` applies the rule (docs/promotion.md):

- a champion that cannot be read or fails its checksums: held back, CURRENT.json left in force;
- an absolute floor not met (PROMOTE_MIN_ACCURACY, PROMOTE_MIN_MACRO_RECALL): held back;
- no champion yet: promoted;
- classes that differ from the champion's: no like-for-like comparison, the floors alone decide;
- a significant drop (exact McNemar p < 0.05 for accuracy, the bootstrap 95 % interval below 0
  for macro recall) larger than PROMOTE_MAX_DROP: held back; anything else promotes.

The version is written whole before CURRENT.json switches, conditioned on the pointer compared
against; a run that loses that race compares again with the new champion. promotion.json (the
verdict and its figures) goes into the run directory, added to its MANIFEST.json, and report.html
gets a Promotion section. A held-back run is a successful run: its verdict is the record.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

import storage
from common import run_files
from edge import logs as edge_logs
from edge.runtime import predict_labels
from job.config import Config
from job.promotion import paired, pointer, versions
from job.results import run_page

log = logging.getLogger("job")

SIGNIFICANCE = 0.05
ATTEMPTS = 3  # comparisons before a run that keeps losing the switch holds back
ONNX_FLOAT32, ONNX_INT8 = "model.onnx", "model.int8.onnx"


@dataclasses.dataclass(frozen=True)
class Challenger:
    """This run as promotion sees it: its local folder, metrics and labelled test predictions."""

    run_dir: Path
    metrics: dict
    labels: np.ndarray | None  # None: no test predictions (see load_challenger)
    predicted: np.ndarray | None
    paths: list[str]  # the test images, absolute, in the order of the run's decoded cache
    export_dir: Path | None
    export_files: list[str]  # the ONNX files that passed their gates
    int8: str  # "included", "not exported", or why it was held back

    @property
    def float32(self) -> str:
        if self.export_dir is None:
            return "not exported"
        return "passed" if ONNX_FLOAT32 in self.export_files else "failed its gate"

    @property
    def classes(self) -> list[str]:
        return self.metrics["classes"]


def already_recorded(config: Config) -> bool:
    """Whether this run's promotion verdict is already written (a rerun has nothing to do)."""
    return storage.exists(storage.join(config.run_uri, run_files.PROMOTION),
                          retry_deadline=config.storage_deadline)


def promote_run(config: Config, scratch_dir: Path, export_uri: str | None) -> dict:
    """Compares this run with the champion, promotes it or holds it back, records the verdict in
    the run directory and logs it; returns promotion.json's content."""
    challenger = load_challenger(config, export_uri)
    staged = None
    for attempt in range(1, ATTEMPTS + 1):
        current, token = None, None
        try:
            current, token = versions.read_current(config.promote_uri, config.storage_deadline)
            verdict = judge(config, challenger, current, scratch_dir)
        except versions.ChampionUnusable as error:
            verdict = held_back(f"the champion cannot be used ({error}); CURRENT.json is left in "
                                "force: repair it or roll back (docs/promotion.md)")
        if not verdict["promoted"] or verdict.get("already_current"):
            break
        staged = staged or stage_version(config, challenger, verdict_record(config, challenger,
                                                                              verdict))
        if switch(config, staged, current, token):
            break
        verdict = held_back(f"CURRENT.json changed {attempt} times while this run compared "
                            "with it (other runs promoted meanwhile)")
        if attempt < ATTEMPTS:
            log.warning("promotion: CURRENT.json changed while this run compared with it; "
                        "comparing again with the new champion")
    if staged is not None:  # published, or held back after all: the cache's copy is done
        shutil.rmtree(staged, ignore_errors=True)
    record = verdict_record(config, challenger, verdict)
    write_record(config, challenger, record)
    announce(record)
    return record


def verdict_record(config: Config, challenger: Challenger, verdict: dict) -> dict:
    """promotion.json's content: the verdict, what was promoted and the rule applied."""
    return {**verdict, "run_id": config.run_id, "promote_uri": config.promote_uri,
            "onnx_float32": challenger.float32, "int8": challenger.int8,
            "created_utc": versions.utc_now(),
            "rule": {"max_drop": config.promote_max_drop, "significance": SIGNIFICANCE,
                     "min_accuracy": config.promote_min_accuracy,
                     "min_macro_recall": config.promote_min_macro_recall}}


def held_back(reason: str, **figures) -> dict:
    return {"promoted": False, "status": "held_back", "reason": reason, **figures}


def judge(config: Config, challenger: Challenger, current: dict | None,
          scratch_dir: Path) -> dict:
    """The verdict on this run against the champion `current` names (None: no champion yet)."""
    if current is not None and current.get("run_id") == challenger.metrics.get("run_id"):
        return {"promoted": True, "status": "promoted", "already_current": True,
                "reason": "CURRENT.json already names this run: an earlier attempt switched it"}
    if challenger.float32 == "failed its gate":
        return held_back("the ONNX float32 file failed its gate: the edge would have no model")
    if challenger.predicted is None:
        return held_back("this run has no test_predictions.json (no test split), so it cannot "
                         "be compared")
    own = {"accuracy": float(np.mean(challenger.predicted == challenger.labels)),
           "macro_recall": paired.macro_recall(challenger.labels,
                                               challenger.predicted == challenger.labels,
                                               len(challenger.classes))}
    floors = {"accuracy": config.promote_min_accuracy,
              "macro_recall": config.promote_min_macro_recall}
    for metric, floor in floors.items():
        if own[metric] < floor:
            return held_back(f"test {metric.replace('_', ' ')} {own[metric]:.4f} is under "
                             f"PROMOTE_MIN_{metric.upper()} {floor:g}", challenger_figures=own)
    if current is None:
        return {"promoted": True, "status": "promoted", "champion": None,
                "reason": "no champion yet: the first run is promoted (its floors are met)",
                "challenger_figures": own}
    champion = {"run_id": current.get("run_id"), "version": current["version"]}
    # Checked whatever the classes: a run is never promoted over a champion that fails them.
    champion_dir = versions.fetch_verified(current, config.promote_uri, config.cache_dir,
                                           config.storage_deadline)
    if current.get("classes") != challenger.classes:
        return {"promoted": True, "status": "promoted", "champion": champion,
                "challenger_figures": own,
                "reason": f"the classes differ from the champion's ({class_change(current['classes'], challenger.classes)}): "
                          "no like-for-like comparison, so only the floors apply, and they are met"}
    started = time.perf_counter()
    champion_predicted = score_champion(champion_dir, current, challenger, scratch_dir,
                                        config.batch_size)
    seconds = round(time.perf_counter() - started, 2)
    comparison = paired.compare(challenger.labels, challenger.predicted, champion_predicted,
                                len(challenger.classes), seed=config.seed)
    return {**decide(comparison, config.promote_max_drop), "champion": champion,
            "comparison": comparison.as_dict(), "champion_scoring_seconds": seconds,
            "per_class_recall": per_class_recall(challenger, champion_predicted)}


def decide(comparison: paired.Comparison, max_drop: float) -> dict:
    """Held back for a significant drop larger than max_drop in accuracy or macro recall."""
    significant = {"accuracy": comparison.p_value < SIGNIFICANCE,
                   "macro_recall": comparison.interval["macro_recall"][1] < 0}
    for metric in ("accuracy", "macro_recall"):
        drop = -comparison.difference[metric]
        if drop > max_drop and significant[metric]:
            return held_back(
                f"test {metric.replace('_', ' ')} dropped {drop:.4f} "
                f"({comparison.champion[metric]:.4f} to {comparison.challenger[metric]:.4f}) on "
                f"the same {comparison.images} images, significantly ({_evidence(comparison, metric)}), "
                f"more than PROMOTE_MAX_DROP {max_drop:g}")
    return {"promoted": True, "status": "promoted",
            "reason": f"no significant drop larger than PROMOTE_MAX_DROP {max_drop:g} (accuracy "
                      f"{comparison.challenger['accuracy']:.4f} against the champion's "
                      f"{comparison.champion['accuracy']:.4f} on the same {comparison.images} "
                      f"images, McNemar p={comparison.p_value:.3g})"}


def _evidence(comparison: paired.Comparison, metric: str) -> str:
    if metric == "accuracy":
        return (f"McNemar p={comparison.p_value:.3g}, {comparison.only_champion_right} images "
                f"right only by the champion, {comparison.only_challenger_right} only by this run")
    low, high = comparison.interval[metric]
    return f"95 % interval of the difference {low:.4f} to {high:.4f}"


def class_change(before: list[str], after: list[str]) -> str:
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    parts = [f"added {added}" if added else "", f"removed {removed}" if removed else ""]
    return ", ".join(part for part in parts if part) or "same names in another order"


def per_class_recall(challenger: Challenger, champion_predicted: np.ndarray) -> dict:
    def recalls(predicted):
        right = predicted == challenger.labels
        support = np.bincount(challenger.labels, minlength=len(challenger.classes))
        hits = np.bincount(challenger.labels, weights=right, minlength=len(challenger.classes))
        return {name: (float(hit / count) if count else None)
                for name, hit, count in zip(challenger.classes, hits, support)}

    return {"challenger": recalls(challenger.predicted), "champion": recalls(champion_predicted)}


def load_challenger(config: Config, export_uri: str | None) -> Challenger:
    """This run's files and test predictions (written by the run: test_predictions.json)."""
    run_dir = _local(config.run_uri, config, "run")
    metrics = json.loads((run_dir / run_files.METRICS).read_text())
    predictions = run_page.read_predictions(run_dir / run_files.PREDICTIONS, None)
    export_dir, export_files, int8 = None, [], "not exported"
    if export_uri:
        export_dir = _local(export_uri, config, "export") if export_uri != config.run_uri \
            else run_dir
        export_report = json.loads((export_dir / run_files.EXPORT_REPORT).read_text())
        export_files = list(export_report.get("files") or {})
        int8 = "included" if ONNX_INT8 in export_files else \
            "held back: " + "; ".join(export_report.get("failed_gates") or ["not written"])
    if predictions is None:  # no test split
        return Challenger(run_dir, metrics, None, None, [], export_dir, export_files, int8)
    data_root = storage.local_dir_for(config.data_uri, config.cache_dir / "data")
    return Challenger(run_dir, metrics, predictions.labels,
                      predict_labels(predictions.probabilities, metrics.get("decision_threshold", 0.5)),
                      [str(data_root / path) for path in predictions.paths],
                      export_dir, export_files, int8)


def score_champion(champion_dir: Path, current: dict, challenger: Challenger, scratch_dir: Path,
                   batch_size: int) -> np.ndarray:
    """The champion's labels of this run's test images: one pass of them through its SavedModel.
    The images come from the run's decoded cache (decoded now only if a rerun lost it), at this
    run's image size; where the champion's differs they are resized to it bilinearly, with
    antialiasing as Pillow's resize of the originals has, and rounded to 8 bits as decoding does."""
    import tensorflow as tf

    from job.inputs import data
    from job.training import serving

    try:
        serve = tf.saved_model.load(str(champion_dir / run_files.SAVED_MODEL)).signatures[
            serving.PIXELS_SIGNATURE]  # float32 pixels: every run's SavedModel has it
    except Exception as error:  # a SavedModel that passed its checksums yet does not load
        raise versions.ChampionUnusable(f"its SavedModel does not load ({error})") from None
    input_name = next(iter(serve.structured_input_signature[1]))
    scratch_dir.mkdir(parents=True, exist_ok=True)  # a rerun's, its first run's removed
    size, own_size = int(current["image_size"]), int(challenger.metrics["record"]["image_size"])
    images = data.image_dataset(data.Split(challenger.paths, challenger.labels.tolist()),
                                own_size, batch_size, cache_file=str(scratch_dir / "test"))
    outputs = []
    for batch, _ in images:
        if size != own_size:
            batch = tf.round(tf.clip_by_value(
                tf.image.resize(batch, (size, size), antialias=True), 0, 255))
        outputs.append(next(iter(serve(**{input_name: batch}).values())).numpy())
    return predict_labels(np.concatenate(outputs), current.get("decision_threshold", 0.5))


def stage_version(config: Config, challenger: Challenger, record: dict) -> Path:
    """The version's files in the cache, its report.html the run's with the Promotion section of
    the verdict it is published on (should another run switch CURRENT.json first, the comparison
    made again is the run's promotion.json)."""
    promotion_dir = config.cache_dir / "promotion"
    promotion_dir.mkdir(parents=True, exist_ok=True)
    promoted_report = promotion_dir / run_files.RUN_PAGE
    render_report(config, challenger, record, promoted_report)
    return versions.stage(promotion_dir / "staging" / config.run_id, challenger.run_dir,
                          challenger.export_dir, challenger.export_files,
                          replaced={run_files.RUN_PAGE: promoted_report})


def render_report(config: Config, challenger: Challenger, record: dict, path: Path) -> None:
    """The run's report.html, its Promotion section filled in from record, to path."""
    export_report = None
    if challenger.export_dir is not None:
        export_report = json.loads((challenger.export_dir / run_files.EXPORT_REPORT).read_text())
    data_root = storage.local_dir_for(config.data_uri, config.cache_dir / "data")
    predictions = run_page.read_predictions(challenger.run_dir / run_files.PREDICTIONS, data_root)
    run_page.write_page(path, challenger.metrics, predictions, export_report, promotion=record)


def switch(config: Config, staged: Path, current: dict | None, token: str) -> bool:
    """Publishes the version (whole, MANIFEST.json last), then switches CURRENT.json to it if it
    still names the champion compared against; False when another run switched it first."""
    uri = versions.version_uri(config.promote_uri, config.run_id)
    versions.publish(staged, uri, config.storage_deadline)
    history = [versions.history_entry(current), *current.get("history", [])] if current else []
    return pointer.replace(versions.current_uri(config.promote_uri),
                           versions.json_bytes(versions.pointer_to(staged, uri, history)), token,
                           retry_deadline=config.storage_deadline)


def write_record(config: Config, challenger: Challenger, record: dict) -> None:
    """promotion.json and report.html (its Promotion section filled in) into the run directory,
    and both into its MANIFEST.json (run_files.AMENDED_BY_PROMOTION: the one change to a complete
    run, made by the process that published it)."""
    run_dir = challenger.run_dir
    run_files.write_json(run_dir / run_files.PROMOTION, record)
    render_report(config, challenger, record, run_dir / run_files.RUN_PAGE)
    if storage.is_remote(config.run_uri):  # (a local run directory is run_dir itself)
        for name in (run_files.PROMOTION, run_files.RUN_PAGE):
            uri = storage.join(config.run_uri, name)
            _, token = pointer.read(uri, retry_deadline=config.storage_deadline)
            pointer.replace(uri, (run_dir / name).read_bytes(), token,
                            retry_deadline=config.storage_deadline)
    add_to_manifest(config, [run_dir / name for name in run_files.AMENDED_BY_PROMOTION])


def add_to_manifest(config: Config, paths: list[Path]) -> None:
    """The files' entries added to (or replaced in) the run's MANIFEST.json, so the run still
    matches it. On gs:// the manifest is replaced as CURRENT.json is, conditioned on the version
    read, so nothing another writer added is lost; a local run directory is written by this run
    alone (a rename, as every file of it)."""
    entries = {path.name: {"bytes": path.stat().st_size, "sha256": run_files.sha256(path)}
               for path in paths}
    if not storage.is_remote(config.run_uri):
        manifest_path = Path(config.run_uri, run_files.MANIFEST)
        manifest = json.loads(manifest_path.read_text())
        manifest["files"].update(entries)
        run_files.write_json(manifest_path, manifest)
        return
    manifest_uri = storage.join(config.run_uri, run_files.MANIFEST)
    for _ in range(ATTEMPTS):
        data, token = pointer.read(manifest_uri, retry_deadline=config.storage_deadline)
        manifest = json.loads(data)
        manifest["files"].update(entries)
        if pointer.replace(manifest_uri, versions.json_bytes(manifest), token,
                           retry_deadline=config.storage_deadline):
            return
    raise storage.StorageError(f"{manifest_uri}: changed {ATTEMPTS} times while promotion.json "
                               "and report.html were being entered in it")


def announce(record: dict) -> None:
    """The one log line of the verdict, with its figures as fields in JSON logs."""
    comparison = record.get("comparison") or {}
    figures = {key: value for key, value in {
        "promoted": record["promoted"], "p_value": comparison.get("p_value"),
        "challenger_accuracy": (comparison.get("challenger") or {}).get("accuracy"),
        "champion_accuracy": (comparison.get("champion") or {}).get("accuracy")}.items()
        if value is not None}
    verdict = "promoted" if record["promoted"] else "held back"
    log.info("promotion: %s: %s; int8: %s", verdict, record["reason"], record["int8"],
             extra=edge_logs.fields(metrics=figures))


def _local(uri: str, config: Config, name: str) -> Path:
    if not storage.is_remote(uri):
        return Path(uri)
    return storage.fetch_tree(uri, config.cache_dir / "promotion" / name,
                              retry_deadline=config.storage_deadline)
