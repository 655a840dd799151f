"""The edge side: what a device needs to run an exported ONNX model, and nothing that imports
TensorFlow (a test imports it with TensorFlow made unimportable).

- `edge.images`: decoding any image file to the model's input, exactly as training did;
- `edge.files`: which files under a folder to read, each real file once, as training did;
- `edge.runtime`: the CPU runtimes (onnxruntime, optionally OpenVINO), the cores to give them,
  the label a model's output means, the exit codes;
- `edge.predict`: the predictor, `python -m edge.predict MODEL INPUT`;
- `edge.selftest`: `python -m edge.predict --self-test PATH`, the exported files checked on this
  CPU against the self-test set the export stored beside them.

The training job and the export use the same pieces, so a deployed model sees its pixels, threads
and decision rule as they were measured.
"""
