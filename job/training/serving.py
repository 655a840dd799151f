"""Serving: the SavedModel's signatures, float32 pixels and encoded image bytes.

`serving_default` (what Vertex AI's prebuilt TensorFlow prediction container, i.e. TF Serving,
calls) takes `image_bytes`: a batch of encoded images (tf.string; JPEG, PNG, GIF's first frame,
BMP; grayscale, palette and RGBA too), so a request is TF Serving's image convention
`{"instances": [{"image_bytes": {"b64": "..."}}]}` instead of a megabyte of JSON floats per image.
It decodes and resizes inside the graph as training's decoder does (edge.images.load_image: 8-bit
RGB, alpha dropped; a JPEG decoded by libjpeg at the reduced scale Pillow's draft picks; bilinear
resizing over the whole footprint, i.e. antialiased, rows then columns, rounded to 8 bits after
each pass as Pillow rounds), and returns
`probabilities` (what the float32 signature returns) and `label` (the class name from labels.txt,
decided at the run's validation-chosen threshold for two classes, the largest otherwise), so a
client needs neither the job's decoder nor its threshold. Unlike load_image it does not apply EXIF
orientation: clients send upright images.

`serve` (the name Keras' ExportArchive gave it, which export/convert.py and export/measure.py
call) takes float32 RGB pixels 0-255 `image` [batch, S, S, 3] and returns `output_0`, the
probabilities: the path the ONNX export converts and measures.
"""
from __future__ import annotations

import keras
import tensorflow as tf

PIXELS_SIGNATURE, BYTES_SIGNATURE = "serve", "serving_default"
BYTES_INPUT = "image_bytes"  # TF Serving decodes {"b64": ...} for inputs whose name ends in _bytes


def export(classifier: keras.Model, path: str, class_names: list[str], threshold: float) -> None:
    """Writes classifier as a SavedModel at path with both signatures (module docstring), and the
    variables they read.

    By tf.saved_model.save from the two functions traced once each, rather than by
    keras.export.ExportArchive: its writing traced the classifier twice more (once for the bytes
    signature, once again as it saved) and walked every layer for lookup tables, of which this
    model has none; that took twice the time (docs/benchmarks.md)."""
    size = int(classifier.input_shape[1])
    pixels = tf.function(
        lambda image: classifier(image, training=False), autograph=False,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
    labels = tf.constant(class_names)

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda encoded: decode_image(encoded, size), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
        probabilities = pixels(images)
        if len(class_names) == 2:
            chosen = tf.cast(probabilities[:, 0] >= threshold, tf.int32)
        else:
            chosen = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "label": tf.gather(labels, chosen)}

    by_bytes = tf.function(serve_bytes, autograph=False,
                           input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    signatures = {PIXELS_SIGNATURE: pixels.get_concrete_function(),
                  BYTES_SIGNATURE: by_bytes.get_concrete_function()}
    root = tf.Module()
    root.saved_variables = list(signatures[PIXELS_SIGNATURE].variables)
    for name, function in ((PIXELS_SIGNATURE, pixels), (BYTES_SIGNATURE, by_bytes)):
        setattr(root, name, function)  # callable on the loaded object too, as signatures are
    tf.saved_model.save(root, path, signatures=signatures)


def decode_image(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """One encoded image as float32 RGB 0-255 (size, size, 3), as edge.images.load_image makes it."""
    if_jpeg = lambda: _decode_jpeg_drafted(encoded, size)  # noqa: E731
    otherwise = lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False)  # noqa: E731
    image = tf.cond(tf.io.is_jpeg(encoded), if_jpeg, otherwise)
    image.set_shape([None, None, 3])
    # Pillow resizes rows first, then columns, rounding to 8 bits (half up) after each pass. So
    # does this: at 96 px, 0.2 to 0.7 % of the X-rays' and intel_scenes' values then differ from
    # load_image's (by 1), against 14 to 18 % resized in one pass (README).
    pixels = tf.cast(image, tf.float32)
    for height in (tf.shape(image)[0], size):
        pixels = tf.image.resize(pixels, (height, size), method="bilinear", antialias=True)
        pixels = tf.clip_by_value(tf.floor(pixels + 0.5), 0.0, 255.0)
    return pixels


def _decode_jpeg_drafted(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """A JPEG decoded at 1/1, 1/2, 1/4 or 1/8 scale: the smallest that keeps both sides at least
    size, as Pillow's draft (load_image) picks it, by libjpeg's accurate integer DCT (Pillow's)."""
    height_width = tf.io.extract_jpeg_shape(encoded)[:2]
    scale = tf.reduce_min(height_width) // size
    branch = tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))
    return tf.switch_case(branch, [
        (lambda ratio=ratio: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio,
                                               dct_method="INTEGER_ACCURATE"))
        for ratio in (1, 2, 4, 8)])
