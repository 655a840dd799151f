"""The SavedModel's signatures (job/training/serving.py): encoded image bytes as `serving_default`, decoded in
the graph as training decodes, and float32 pixels as `serve`; and TF Serving's JSON form of a
request, mapped onto the loaded SavedModel in-process as TF Serving maps it (there is no TF Serving
binary here)."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from edge.images import load_images
from edge.runtime import predict_labels
from job.training import serving

PROBABILITY_MARGIN = 0.02


@pytest.fixture(scope="module")
def loaded(xray_serving_model):
    return tf.saved_model.load(str(xray_serving_model["path"]))


def tf_serving_predict(loaded, body: str) -> dict:
    """What TF Serving's REST predict API answers to body (row format, `instances`): each instance
    is a dict of the signature's inputs, or the value itself where the signature has one input;
    {"b64": ...} is binary. Answers {"predictions": [...]}, a dict per instance of several outputs."""
    request = json.loads(body)
    signature = loaded.signatures[request.get("signature_name", "serving_default")]
    names = list(signature.structured_input_signature[1])

    def value(item):
        return base64.b64decode(item["b64"]) if isinstance(item, dict) and "b64" in item else item

    rows = [instance if isinstance(instance, dict) and set(instance) == set(names)
            else {names[0]: instance} for instance in request["instances"]]
    outputs = signature(**{name: tf.constant([value(row[name]) for row in rows])
                           for name in names})
    plain = {name: [item.decode() if isinstance(item, bytes) else item
                    for item in tensor.numpy().tolist()] for name, tensor in outputs.items()}
    return {"predictions": [{name: column[index] for name, column in plain.items()}
                            for index in range(len(rows))]}


def serve_both(loaded, paths: list[Path], size: int) -> tuple[dict, np.ndarray]:
    """The bytes signature's outputs for the files' bytes, and the float32 signature's
    probabilities for the same files decoded by edge.images.load_image."""
    encoded = tf.constant([path.read_bytes() for path in paths])
    from_bytes = loaded.signatures[serving.BYTES_SIGNATURE](image_bytes=encoded)
    pixels = tf.constant(load_images([str(path) for path in paths], size))
    from_pixels = loaded.signatures[serving.PIXELS_SIGNATURE](image=pixels)["output_0"]
    return from_bytes, from_pixels.numpy()


def assert_same_predictions(loaded, model: dict, paths: list[Path]) -> None:
    from_bytes, from_pixels = serve_both(loaded, paths, model["size"])
    expected = [model["classes"][index]
                for index in predict_labels(from_pixels, model["threshold"])]
    assert [label.decode() for label in from_bytes["label"].numpy()] == expected
    np.testing.assert_allclose(from_bytes["probabilities"].numpy(), from_pixels,
                               atol=PROBABILITY_MARGIN)


def converted(paths: list[Path], folder: Path, mode: str, fmt: str) -> list[Path]:
    """Copies of the images in another mode (alpha: a gradient, so it varies) and format."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for number, path in enumerate(paths):
        with Image.open(path) as image:
            copy = image.convert(mode)
        if "A" in mode:
            copy.putalpha(Image.linear_gradient("L").resize(copy.size))
        copies.append(folder / f"{number}.{fmt.lower()}")
        copy.save(copies[-1], fmt)
    return copies


@pytest.fixture(scope="module")
def xray_test_jpegs(xray_dir) -> list[Path]:
    """20 test X-rays per class: RGB JPEGs of 224 x 224."""
    return [path for name in ("NORMAL", "PNEUMONIA")
            for path in sorted((xray_dir / "test" / name).iterdir())[:20]]


def test_bytes_signature_labels_real_jpegs_as_the_pixels_signature_labels_load_image(
        loaded, xray_serving_model, xray_test_jpegs):
    assert_same_predictions(loaded, xray_serving_model, xray_test_jpegs)


def test_bytes_signature_decodes_original_size_grayscale_jpegs_as_load_image(
        loaded, xray_serving_model, xray_originals_dir):
    """The originals are mostly grayscale and up to about 2000 px: load_image decodes them at a
    reduced JPEG scale (Pillow's draft) before resizing, and so must the graph."""
    paths = sorted(path for path in (xray_originals_dir / "test").rglob("*") if path.is_file())
    assert_same_predictions(loaded, xray_serving_model, paths)


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"),
                                       ("P", "PNG"), ("LA", "PNG"), ("L", "JPEG")])
def test_bytes_signature_takes_png_grayscale_palette_and_alpha_images(
        loaded, xray_serving_model, xray_test_jpegs, tmp_path, mode, fmt):
    paths = converted(xray_test_jpegs[::4], tmp_path, mode, fmt)
    assert_same_predictions(loaded, xray_serving_model, paths)


def test_in_graph_decode_is_within_two_levels_of_load_image_on_real_jpegs(xray_originals_dir,
                                                                           xray_test_jpegs):
    """Both decode JPEGs with libjpeg's accurate integer DCT at the same scale and resize rows
    then columns; each pass may round one level apart (2 is the largest seen, on 1,913 images)."""
    from edge.images import load_image

    paths = xray_test_jpegs[:10] + sorted((xray_originals_dir / "test" / "NORMAL").iterdir())[:5]
    decode = tf.function(lambda encoded: serving.decode_image(encoded, 96))
    for path in paths:
        difference = np.abs(decode(tf.constant(path.read_bytes())).numpy()
                            - load_image(str(path), 96).astype(np.float32))
        assert difference.max() <= 2.0 and difference.mean() < 0.05, path


def test_a_tf_serving_json_request_of_real_images_gets_labels_and_probabilities(
        loaded, xray_serving_model, xray_test_jpegs):
    paths = xray_test_jpegs[:3] + xray_test_jpegs[-3:]
    body = json.dumps({"instances": [
        {serving.BYTES_INPUT: {"b64": base64.b64encode(path.read_bytes()).decode()}}
        for path in paths]})
    predictions = tf_serving_predict(loaded, body)["predictions"]
    from_bytes, _ = serve_both(loaded, paths, xray_serving_model["size"])
    assert [p["label"] for p in predictions] == \
        [label.decode() for label in from_bytes["label"].numpy()]
    assert all(p["label"] in xray_serving_model["classes"] for p in predictions)
    np.testing.assert_allclose([p["probabilities"] for p in predictions],
                               from_bytes["probabilities"].numpy(), atol=1e-6)


def test_labels_of_more_than_two_classes_are_the_most_probable(tmp_path):
    images = keras.Input((8, 8, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(images)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(pooled)
    model = keras.Model(images, outputs)
    model.get_layer("probabilities").set_weights([np.eye(3, dtype=np.float32) / 10,
                                                  np.zeros(3, np.float32)])
    serving.export(model, str(tmp_path / "saved_model"), ["red", "green", "blue"], threshold=0.9)
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    encoded = [tf.io.encode_png(tf.broadcast_to(tf.one_hot(channel, 3, 255, 0, dtype=tf.uint8),
                                                [8, 8, 3]))
               for channel in (2, 0, 1)]  # pure blue, red, green images
    served = loaded.signatures[serving.BYTES_SIGNATURE](image_bytes=tf.stack(encoded))
    assert [label.decode() for label in served["label"].numpy()] == ["blue", "red", "green"]


# The recipe in docs/vertex.md: what can be checked without a Vertex AI project.
DOCS = Path(__file__).resolve().parents[1] / "docs" / "vertex.md"
BATCH_JOB = Path(__file__).resolve().parents[1] / "infra" / "vertex" / "batch-prediction.json"


def test_the_request_the_docs_build_from_image_files_is_answered_with_labels(
        loaded, xray_serving_model, xray_test_jpegs, tmp_path):
    import subprocess
    import sys

    command = next(line.strip() for line in DOCS.read_text().splitlines()
                   if line.strip().startswith("python3 -c"))
    (tmp_path / "image1.jpeg").write_bytes(xray_test_jpegs[0].read_bytes())
    converted([xray_test_jpegs[-1]], tmp_path / "png", "L", "PNG")[0].rename(tmp_path / "image2.png")
    subprocess.run(command.replace("python3 ", f"{sys.executable} ", 1), shell=True, check=True,
                   cwd=tmp_path)
    predictions = tf_serving_predict(loaded, (tmp_path / "request.json").read_text())["predictions"]
    from_bytes, _ = serve_both(loaded, [tmp_path / "image1.jpeg", tmp_path / "image2.png"],
                               xray_serving_model["size"])
    assert [p["label"] for p in predictions] == \
        [label.decode() for label in from_bytes["label"].numpy()]


def test_batch_file_list_instances_are_taken_as_the_single_image_bytes_input(
        loaded, xray_test_jpegs):
    """Vertex AI's file-list batch input sends each file as {"b64": ...}, no input name."""
    paths = xray_test_jpegs[:2]
    by_name = tf_serving_predict(loaded, json.dumps({"instances": [
        {serving.BYTES_INPUT: {"b64": base64.b64encode(path.read_bytes()).decode()}}
        for path in paths]}))
    bare = tf_serving_predict(loaded, json.dumps({"instances": [
        {"b64": base64.b64encode(path.read_bytes()).decode()} for path in paths]}))
    assert bare == by_name


def test_the_batch_prediction_job_reads_a_file_list_and_writes_json_lines():
    job = json.loads(BATCH_JOB.read_text())
    assert job["inputConfig"]["instancesFormat"] == "file-list"
    assert all(uri.startswith("gs://") for uri in job["inputConfig"]["gcsSource"]["uris"])
    assert job["outputConfig"]["predictionsFormat"] == "jsonl"
    assert job["outputConfig"]["gcsDestination"]["outputUriPrefix"].startswith("gs://")
    assert "/models/" in job["model"] and "batch-prediction.json" in DOCS.read_text()


def test_the_docs_name_the_files_and_threshold_the_run_writes():
    import dataclasses

    from common.record import RunRecord
    from export.pipeline import RUN_FILES

    text = DOCS.read_text()
    for name in ("saved_model", "labels.txt", "metrics.json"):
        assert name in RUN_FILES and name in text
    assert "--artifact-uri=gs://acme-ml-prod-models/image-classifier/RUN_ID/saved_model" in text
    assert "decision_threshold" in {field.name for field in dataclasses.fields(RunRecord)}
    assert "`decision_threshold`" in text
