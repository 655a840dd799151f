"""The edge self-test: the export's selftest/ set and `python -m edge.predict --self-test PATH`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge import predict
from edge.selftest import SELFTEST_ARRAYS, SELFTEST_DIR, SELFTEST_SPEC, gate

ONNX_FILES = ("model.onnx", "model.int8.onnx")


@pytest.fixture
def export_copy(mobilenet_export, mobilenet_run, tmp_path) -> Path:
    """The MobileNetV2 run's export (ONNX files, labels, selftest/) copied, to tamper with."""
    assert mobilenet_export[0] == 0, mobilenet_export[2][-2000:]
    folder = tmp_path / "export"
    folder.mkdir()
    for name in (*ONNX_FILES, "labels.txt", "export_report.json"):
        shutil.copy2(mobilenet_run / name, folder / name)
    shutil.copytree(mobilenet_run / SELFTEST_DIR, folder / SELFTEST_DIR)
    return folder


def self_test(path: Path, capsys) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of `python -m edge.predict --self-test path`, run
    in-process."""
    code = predict.main(["--self-test", str(path)], environ={"LOG_FORMAT": "text"})
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_the_export_writes_a_small_selftest_set_with_its_gate_limits(mobilenet_export,
                                                                     mobilenet_run):
    _, report, _ = mobilenet_export
    folder = mobilenet_run / SELFTEST_DIR
    spec = json.loads((folder / SELFTEST_SPEC).read_text())
    with np.load(folder / SELFTEST_ARRAYS) as arrays:
        images, labels, reference = arrays["images"], arrays["labels"], arrays["reference"]
    assert images.shape == (spec["images"], 96, 96, 3) and images.dtype == np.uint8
    assert 24 <= spec["images"] <= 48 and len(labels) == len(reference) == spec["images"]
    assert set(labels) == {0, 1}  # both classes
    assert spec["decision_threshold"] == report["decision_threshold"]
    assert set(spec["files"]) == set(ONNX_FILES)
    for name, entry in spec["files"].items():
        gate = report["gates"][entry["format"]]  # the export's limits, held on the device too
        assert entry["gate"] == gate and entry["limits"].items() >= gate.items()
    int8 = spec["files"]["model.int8.onnx"]
    assert int8["limits"]["max_abs_diff"] == pytest.approx(  # the file keeps 6 decimals
        int8["at_export"]["max_abs_diff"] + spec["max_abs_diff_margin"], abs=1e-6)
    assert report["selftest"]["bytes"] == {path.name: path.stat().st_size
                                           for path in folder.iterdir()}
    assert sum(report["selftest"]["bytes"].values()) < 1_000_000  # 32 images at 96 px


def test_self_test_passes_on_an_export_folder(export_copy, capsys):
    code, lines, err = self_test(export_copy, capsys)
    assert code == 0, err
    assert sorted(line.split("\t")[:2] for line in lines) == [
        ["model.int8.onnx", "PASS"], ["model.onnx", "PASS"]]


def test_self_test_passes_on_one_onnx_file(export_copy, capsys):
    code, lines, err = self_test(export_copy / "model.int8.onnx", capsys)
    assert code == 0, err
    assert len(lines) == 1 and lines[0].startswith("model.int8.onnx\tPASS\tagreement 100.00%")


def scale_output_layer(path: Path, factor: float) -> None:
    """Scales the float32 initializer that sets the weights of the file's output layer (its last
    MatMul or Gemm): the weights themselves (a layer kept in float32) or their DequantizeLinear's
    scale (a quantized layer)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    weights = [node for node in model.graph.node
               if node.op_type in ("MatMul", "Gemm")][-1].input[1]
    if weights not in initializers:
        weights = producers[weights].input[1]  # DequantizeLinear(weights, scale, zero point)
    tensor = initializers[weights]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, tensor.name))
    onnx.save(model, str(path))


def test_self_test_fails_the_int8_file_when_it_was_tampered_with(export_copy, capsys):
    scale_output_layer(export_copy / "model.int8.onnx", 0.0)  # every output sigmoid(bias)
    code, lines, err = self_test(export_copy, capsys)
    assert code == 1, err
    failed = [line for line in lines if "\tFAIL\t" in line]
    assert len(failed) == 1 and failed[0].startswith("model.int8.onnx\tFAIL"), lines
    assert "FAILED: model.int8.onnx" in err


def test_self_test_passes_on_a_promoted_version_and_fails_there_once_its_int8_file_is_tampered(
        mobilenet_export, mobilenet_run, tmp_path, capsys):
    """The version folder promotion stages (job/promotion/versions.py) from the run and its export is
    what a device fetches: its copy of the set proves its ONNX files on this CPU."""
    from job.promotion import versions

    assert mobilenet_export[0] == 0, mobilenet_export[2][-2000:]
    version = versions.stage(tmp_path / "versions" / "mobilenet", mobilenet_run, mobilenet_run,
                             list(ONNX_FILES))
    code, lines, err = self_test(version, capsys)
    assert code == 0, err
    assert sorted(line.split("\t")[1] for line in lines) == ["PASS", "PASS"]
    scale_output_layer(version / "model.int8.onnx", 0.0)
    code, lines, err = self_test(version, capsys)
    assert code == 1 and "FAILED: model.int8.onnx" in err, err


def test_self_test_exits_2_without_a_selftest_set(export_copy, capsys):
    shutil.rmtree(export_copy / SELFTEST_DIR)
    code, lines, err = self_test(export_copy, capsys)
    assert code == 2 and lines == []
    assert f"{export_copy}: no self-test set" in err and "Traceback" not in err


def test_self_test_exits_2_on_a_selftest_set_that_cannot_be_read(export_copy, capsys):
    (export_copy / SELFTEST_DIR / SELFTEST_ARRAYS).write_bytes(b"not a numpy archive")
    code, lines, err = self_test(export_copy / "model.onnx", capsys)
    assert code == 2 and lines == []
    assert "unreadable self-test set" in err and "Traceback" not in err


def test_a_file_whose_outputs_moved_fails_even_where_no_label_flipped():
    """An int8 file with a layer scaled can keep every clear label yet move its outputs: its
    largest difference is held to the export CPU's plus the margin."""
    figures = {"top1_agreement": 1.0, "accuracy_difference": 0.0, "max_abs_diff": 0.28}
    limits = {"top1_agreement": 0.99, "max_accuracy_difference": 0.01, "max_abs_diff": 0.18}
    assert gate(figures, limits) == ["max |diff| 0.28 > 0.18"]
    assert gate({**figures, "max_abs_diff": 0.17}, limits) == []


def test_the_set_takes_images_of_every_predicted_class_clear_of_the_threshold():
    from export.selftest import MARGIN_LOGIT, choose_images, room_logit

    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 1, (300, 1)).astype(np.float32)
    int8 = np.clip(reference + rng.normal(0, 0.05, reference.shape), 0, 1)
    chosen, room = choose_images(reference, [int8], 0.7, 32, seed=1)
    labels = (reference[chosen, 0] >= 0.7).astype(int)
    assert len(chosen) == 32 and (room >= MARGIN_LOGIT).all()
    assert (labels == 1).sum() == (labels == 0).sum() == 16  # in turn from each class
    assert (room_logit(int8[chosen], labels, 0.7) >= MARGIN_LOGIT).all()


def test_a_softmax_output_has_the_room_of_its_label_over_the_next_class():
    from export.selftest import room_logit

    outputs = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    np.testing.assert_allclose(room_logit(outputs, np.array([0, 0]), 0.5),
                               [np.log(0.7 / 0.2), np.log(0.3 / 0.4)])
