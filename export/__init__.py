"""Edge export: a finished training run to ONNX (float32 and int8), parity-checked with onnxruntime.

`python -m export` converts; the TensorFlow-free edge predictor is `python -m edge.predict` (edge/).
This package's __init__ imports nothing, so the predictor stays free of TensorFlow.
"""
