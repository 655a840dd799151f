"""python -m edge.predict: the TensorFlow-free edge predictor on real images."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from edge import predict
from edge.runtime import open_model
from tests.conftest import ROOT, write_class_images

HEAVY = ("tensorflow", "keras", "tf2onnx", "tf_keras", "sklearn")


@pytest.fixture(scope="module")
def model_path(mobilenet_onnx) -> Path:
    return mobilenet_onnx


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
    from edge.images import load_images
    from export.measure import saved_model_predictor

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


# --- The optional OpenVINO runtime (requirements-openvino.txt): same ONNX files, same answers.
OPENVINO_MISSING = "OpenVINO is the optional edge runtime: pip install -r requirements-openvino.txt"
TINY_SIZE = 16


def write_tiny_model(path: Path, activations: str = "float32") -> Path:
    """A small classifier in the export's ONNX interface (`image` NHWC RGB 0-255 in, sigmoid
    `probabilities` [batch, 1] out, labels, image_size and decision_threshold in metadata_props):
    it normalises, transposes, runs a 3x3 convolution with Relu6, averages and applies one dense
    unit. activations="int16": the convolution's input and output pass 16-bit
    QuantizeLinear/DequantizeLinear pairs and its weights are int8 per channel, with the Relu6
    folded into the output pair's [0, 6] range, as the export's `mixed_16bit` recipe writes them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    initializers, nodes = [], []

    def constant(name, value):
        initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, output, **attributes):
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def qdq(tensor, low, high):  # a 16-bit pair covering [low, high]: it saturates outside
        scale = constant(f"{tensor}_scale", np.float32((high - low) / 65535))
        zero = constant(f"{tensor}_zero", np.int16(round(-32768 - low * 65535 / (high - low))))
        quantized = node("QuantizeLinear", [tensor, scale, zero], f"{tensor}_q")
        return node("DequantizeLinear", [quantized, scale, zero], f"{tensor}_dq")

    # Large weights: many convolution outputs fall below 0 and above 6, so the clipping matters.
    weights = np.random.default_rng(7).normal(0, 1.5, (4, 3, 3, 3)).astype(np.float32)
    nchw = node("Transpose", ["image"], "nchw", perm=[0, 3, 1, 2])
    scaled = node("Mul", [nchw, constant("inverse", np.float32(1 / 127.5))], "scaled")
    normalised = node("Sub", [scaled, constant("one", np.float32(1))], "normalised")
    if activations == "int16":
        step = (np.abs(weights).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
        integers = np.round(weights / step[:, None, None, None]).astype(np.int8)
        quantized_weights = [constant("w_q", integers), constant("w_step", step),
                             constant("w_zero", np.zeros(4, np.int8))]
        conv_inputs = [qdq(normalised, -1.0, 1.0),
                       node("DequantizeLinear", quantized_weights, "w_dq", axis=0)]
    else:
        conv_inputs = [normalised, constant("w", weights)]
    conv = node("Conv", [*conv_inputs, constant("b", np.float32([0.5, -0.5, 1, 0]))], "conv",
                pads=[1, 1, 1, 1])
    if activations == "int16":
        relu6 = qdq(conv, 0.0, 6.0)
    else:
        bounds = [constant("zero", np.float32(0)), constant("six", np.float32(6))]
        relu6 = node("Clip", [conv, *bounds], "relu6")
    pooled = node("Flatten", [node("GlobalAveragePool", [relu6], "pooled4d")], "pooled")
    logit = node("Gemm", [pooled, constant("dense", np.float32([[1.5], [-1.0], [0.8], [-1.2]])),
                          constant("dense_bias", np.float32([-0.5]))], "logit")
    node("Sigmoid", [logit], "probabilities")
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                       ["batch", TINY_SIZE, TINY_SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 1])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    helper.set_model_props(model, {"labels": json.dumps(["NORMAL", "PNEUMONIA"]),
                                   "image_size": str(TINY_SIZE), "decision_threshold": "0.5"})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("activations", ["float32", "int16"])
def test_openvino_gives_onnxruntimes_probabilities_and_metadata(activations, tmp_path):
    """int16: OpenVINO 2026.1.0 to 2026.4.1 drop the clipping of 16-bit QDQ pairs (max |diff| 0.19
    here; on an exported MobileNetV2 every X-ray came out PNEUMONIA), hence the pin to 2026.0.0."""
    pytest.importorskip("openvino", reason=OPENVINO_MISSING)
    path = write_tiny_model(tmp_path / f"tiny-{activations}.onnx", activations)
    onnxruntime, openvino = open_model(path, "onnxruntime", 2), open_model(path, "openvino", 2)
    for loaded in (onnxruntime, openvino):
        assert (loaded.input_name, loaded.output_name) == ("image", "probabilities")
        assert loaded.input_shape == [None, TINY_SIZE, TINY_SIZE, 3]
    assert openvino.metadata == onnxruntime.metadata
    assert json.loads(openvino.metadata["labels"]) == ["NORMAL", "PNEUMONIA"]
    images = np.random.default_rng(3).uniform(0, 255, (9, TINY_SIZE, TINY_SIZE, 3))
    images = images.astype(np.float32)
    for batch in (images, images[:1]):  # the batch dimension is dynamic in both
        expected = onnxruntime.run(batch)
        assert expected.shape == (len(batch), 1)
        np.testing.assert_allclose(openvino.run(batch), expected, atol=1e-4)
    assert np.ptp(onnxruntime.run(images)) > 0.1  # probabilities that differ from image to image


def _printed(out: str) -> list[tuple[str, str, float]]:
    rows = (line.split("\t") for line in out.strip().splitlines())
    return [(path, label, float(probability)) for path, label, probability, _ in rows]


def test_predictor_with_openvino_prints_onnxruntimes_labels(model_path, image_folder, capsys):
    pytest.importorskip("openvino", reason=OPENVINO_MISSING)
    assert predict.main([str(model_path), str(image_folder)]) == 0
    expected = _printed(capsys.readouterr().out)
    assert predict.main([str(model_path), str(image_folder), "--runtime", "openvino",
                         "--threads", "2"]) == 0
    printed = _printed(capsys.readouterr().out)
    assert len(printed) == 12
    assert [(path, label) for path, label, _ in printed] == [(p, l) for p, l, _ in expected]
    np.testing.assert_allclose([p for *_, p in printed], [p for *_, p in expected], atol=2e-4)


def test_a_missing_openvino_is_one_error_line_naming_how_to_install_it(image_folder, tmp_path,
                                                                      monkeypatch, capsys):
    pytest.importorskip("onnx", reason="the test builds its model with onnx")
    model = write_tiny_model(tmp_path / "tiny.onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    assert predict.main([str(model), str(image_folder), "--runtime", "openvino"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.endswith(" ERROR edge: runtime openvino: openvino is not installed; install it "
                         "with `pip install -r requirements-openvino.txt`"), line
    assert predict.main([str(model), str(image_folder)]) == 0  # onnxruntime needs no openvino
    assert len(capsys.readouterr().out.strip().splitlines()) == 12


def test_openvino_is_imported_only_when_asked_for(tmp_path):
    model = write_tiny_model(tmp_path / "tiny.onnx")
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, numpy, edge.predict; "
         f"m = edge.predict.Model({str(model)!r}); "
         f"m.outputs(numpy.zeros((1, {TINY_SIZE}, {TINY_SIZE}, 3), numpy.float32)); "
         "print('openvino' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stderr


def test_cpu_description_names_the_model_and_the_extensions_kernels_are_chosen_by():
    from edge.runtime import cpu_description

    cpuinfo = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    model_name = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                      if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                 if line.startswith("flags"))
    description = cpu_description()
    assert description.startswith(model_name)
    extensions = description[len(model_name):].split()
    assert set(extensions) <= set(flags)
    assert set(extensions) <= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"}
    assert ("avx2" in extensions) == ("avx2" in flags)


# --- Folders: walked as the job walks them (edge/files.py), each real file read once.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """write_tiny_model's classifier: enough to see which files the predictor reads, untrained."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture()
def two_images(tmp_path) -> Path:
    """A folder holding two small PNGs, images_0.png and images_1.png."""
    return write_class_images(tmp_path, ["images"], per_class=2) / "images"


def predicted_paths(out: str) -> list[str]:
    return [path for path, *_ in _printed(out)]


@pytest.mark.timeout(60)  # following a -> . and b -> . again and again never ended, memory growing
def test_links_back_to_the_input_folder_are_skipped_and_each_image_predicted_once(
        tiny_model, two_images, capsys):
    (two_images / "a").symlink_to(".")
    (two_images / "b").symlink_to(".")
    assert predict.main([str(tiny_model), str(two_images)]) == 0
    out, err = capsys.readouterr()
    assert predicted_paths(out) == [str(two_images / "images_0.png"),
                                    str(two_images / "images_1.png")]
    for link in ("a", "b"):
        assert f"ERROR edge: {two_images / link}: symbolic link loop: points to an ancestor " \
               "folder" in err
    assert "predicted 2 of 2 file(s); 0 failed; 2 skipped" in err


@pytest.mark.timeout(60)
def test_a_link_up_out_of_a_subfolder_gives_one_prediction_per_image(tiny_model, two_images,
                                                                     capsys):
    (two_images / "sub").mkdir()
    (two_images / "sub" / "up").symlink_to("..")
    assert predict.main([str(tiny_model), str(two_images)]) == 0
    out, err = capsys.readouterr()
    assert len(predicted_paths(out)) == 2
    assert f"ERROR edge: {two_images / 'sub' / 'up'}: symbolic link loop" in err


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symbolic link", "hard link"])
def test_a_file_reached_by_two_paths_is_predicted_once(tiny_model, two_images, link, capsys):
    link(two_images / "images_0.png", two_images / "images_2.png")
    assert predict.main([str(tiny_model), str(two_images)]) == 0
    out, err = capsys.readouterr()
    assert predicted_paths(out) == [str(two_images / "images_0.png"),
                                    str(two_images / "images_1.png")]
    assert f"ERROR edge: {two_images / 'images_2.png'}: same file as images_0.png" in err


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid black-and-white PNG of width x height black pixels (width a multiple of 8): a
    decompression bomb, a file of about width * height / 8000 bytes that decodes to width * height
    bytes (Pillow holds a byte per pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    compressor = zlib.compressobj(9)
    row = bytes(1 + width // 8)  # each row: its filter type (none), then its pixels, 8 a byte
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit gray, not interlaced
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))
    return path


PEAK_MEMORY_CHILD = """
import sys
from edge import predict
code = predict.main(sys.argv[1:])
status = open("/proc/self/status").read().split()
print("peak_kb", status[status.index("VmHWM:") + 1], file=sys.stderr)
sys.exit(code)
"""


def test_a_decompression_bomb_is_skipped_with_its_reason_in_bounded_memory(tiny_model, two_images):
    bomb = write_png_bomb(two_images / "bomb.png", 16000, 16000)  # 256 MB decoded
    assert bomb.stat().st_size < 100_000
    # The peak is the child's own (VmHWM), not this process's or its fork's.
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_CHILD, str(tiny_model),
                             str(two_images)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(predicted_paths(result.stdout)) == 2
    assert f"ERROR edge: {bomb}: too large: 16000x16000 pixels (limit 150,000,000)" \
        in result.stderr
    peak_kb = int(result.stderr.split()[-1])
    assert peak_kb < 200 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
