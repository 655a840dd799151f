"""Int8: static quantization of the float32 ONNX model, its rounding choices and census."""
