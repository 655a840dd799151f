"""python -m edge.predict: the TensorFlow-free edge predictor on real images."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from edge import predict

HEAVY = ("tensorflow", "keras", "tf2onnx", "tf_keras", "sklearn")


@pytest.fixture(scope="module")
def model_path(mobilenet_export, mobilenet_run) -> Path:
    assert (mobilenet_run / "model.onnx").exists(), mobilenet_export[2][-2000:]
    return mobilenet_run / "model.onnx"


@pytest.fixture()
def image_folder(xray_small, tmp_path) -> Path:
    """Twelve real test X-rays of both classes, copied into one folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    for class_dir in sorted((xray_small / "test").iterdir()):
        for image in sorted(class_dir.iterdir())[:6]:
            shutil.copy(image, folder / f"{class_dir.name}-{image.name}")
    return folder


def test_predictor_gives_the_saved_model_labels_on_real_images(model_path, image_folder, tmp_path):
    from export.measure import saved_model_predictor
    from edge.images import load_images

    output = tmp_path / "predictions.json"
    assert predict.main([str(model_path), str(image_folder), "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert len(results) == 12
    images = load_images([r["path"] for r in results], 96)
    saved_model = saved_model_predictor(model_path.parent / "saved_model")(images)[:, 0]
    threshold = json.loads((model_path.parent / "metrics.json").read_text())["decision_threshold"]
    expected = ["PNEUMONIA" if p >= threshold else "NORMAL" for p in saved_model]
    assert [r["label"] for r in results] == expected
    chosen = np.where(saved_model >= threshold, saved_model, 1 - saved_model)
    np.testing.assert_allclose([r["probability"] for r in results], chosen, atol=1e-4)


def test_the_edge_package_never_imports_tensorflow(model_path, image_folder, tmp_path):
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, edge, edge.images, edge.runtime, edge.predict; "
         f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stderr
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError(f"{{name}} is blocked on this edge device")
        sys.meta_path.insert(0, Block())
    """))
    result = subprocess.run(
        [sys.executable, "-m", "edge.predict", str(model_path), str(image_folder)],
        cwd=ROOT, env={"PYTHONPATH": f"{blocker}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 12
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], cwd=ROOT,
                             env={"PYTHONPATH": str(blocker)}, capture_output=True, text=True)
    assert "blocked on this edge device" in blocked.stderr  # the blocker really works


def test_corrupt_file_gets_an_error_line_and_the_rest_are_predicted(model_path, image_folder,
                                                                    capsys):
    (image_folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "notes.txt").write_text("not an image")
    assert predict.main([str(model_path), str(image_folder), "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 12 and all(len(line.split("\t")) == 4 for line in lines)
    assert f"ERROR edge: {image_folder / 'broken.jpeg'}: " in err
    assert f"ERROR edge: {image_folder / 'notes.txt'}: not an image" in err
    assert "predicted 12 of 14 file(s); 2 failed" in err


def test_folder_with_nothing_predictable_exits_1(model_path, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    assert predict.main([str(model_path), str(tmp_path)]) == 1
    assert "broken.png" in capsys.readouterr().err


def test_threshold_decides_the_binary_label(model_path, image_folder, tmp_path):
    output = tmp_path / "p.csv"
    assert predict.main([str(model_path), str(image_folder), "--threshold", "0",
                         "--output", str(output)]) == 0
    rows = output.read_text().strip().splitlines()
    assert rows[0] == "path,label,probability,top_k" and len(rows) == 13
    assert all(row.split(",")[1] == "PNEUMONIA" for row in rows[1:])


def test_single_image_with_top_k_lists_both_classes(model_path, image_folder, capsys):
    image = sorted(image_folder.iterdir())[0]
    assert predict.main([str(model_path), str(image), "--top-k", "5", "--threshold", "0.5"]) == 0
    path, label, probability, top = capsys.readouterr().out.strip().split("\t")
    assert path == str(image) and label in ("NORMAL", "PNEUMONIA")
    names = [item.split("=")[0] for item in top.split()]
    assert sorted(names) == ["NORMAL", "PNEUMONIA"] and names[0] == label


def assert_exits_2_before_predicting(model_path, image_folder, output, problem, capsys) -> None:
    assert predict.main([str(model_path), str(image_folder), "--output", str(output)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1  # one line, nothing predicted
    assert errors[0].endswith(f" ERROR edge: --output {output}: {problem}")


def test_an_output_in_a_folder_that_does_not_exist_exits_2_before_predicting(
        model_path, image_folder, capsys):
    assert_exits_2_before_predicting(model_path, image_folder, "/proc/nope/x.csv",
                                     "folder /proc/nope does not exist", capsys)


def test_an_output_that_is_a_folder_exits_2_before_predicting(model_path, image_folder, tmp_path,
                                                              capsys):
    (tmp_path / "out.json").mkdir()
    assert_exits_2_before_predicting(model_path, image_folder, tmp_path / "out.json", "is a folder",
                                     capsys)


def test_predictions_replace_an_output_file_whole(model_path, image_folder, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    output.parent.mkdir()
    output.write_text("an older run's predictions\n")
    assert predict.main([str(model_path), str(image_folder), "--output", str(output)]) == 0
    lines = output.read_text().splitlines()
    assert lines[0] == "path,label,probability,top_k" and len(lines) == 13
    assert [p.name for p in output.parent.iterdir()] == ["predictions.csv"]  # no temporary file
