"""Runtime: the CPU runtimes that run an exported model, the CPU they run on and the cores to give
them, and the label a model's output means; shared by the edge predictor, the export's
measurements and training's metrics.

The predictor runs a model through `open_model(path, runtime, threads)`, one of RUNTIMES:
onnxruntime (the default, what the export measured) or OpenVINO (optional, installed by
requirements-openvino.txt; it reads the same ONNX files, float32 and QDQ int8). Each gives a
`CpuModel`: a float32 NHWC batch in, the model's output out, and the ONNX file's metadata. A
runtime's package is imported only when that runtime is asked for.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_description() -> str:
    """The CPU model and the vector extensions that decide its kernels' rounding and speed. oneDNN
    picks training's kernels by them, so the same seed on AVX2 and on AVX-512 rounds differently
    and can end at a different model; onnxruntime's int8 kernels run at about twice the rate with
    VNNI or AMX that they reach with AVX2 alone (VGG16: 3x float32 against 1.9x)."""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:  # not Linux
        return platform.processor()
    fields = {key.strip(): value.strip()
              for key, value in (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    extensions = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                    "amx_int8") if flag in flags]
    return " ".join([fields.get("model name", platform.processor()), *extensions])


def cpu_session(path: Path | str, threads: int | None = None):
    """An onnxruntime CPU session tuned for latency: every graph optimisation, `threads` intra-op
    threads (default: every available core), one inter-op thread (the graphs are sequential)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict_labels(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices from a model's output: one sigmoid unit (the probability of class index 1,
    decided at threshold), or a softmax row (its largest)."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape[-1] == 1:
        return (probabilities[:, 0] >= threshold).astype(int)
    return probabilities.argmax(axis=-1)


def compare(candidate: np.ndarray, reference: np.ndarray, threshold: float) -> dict:
    """How far a model's probabilities and labels are from a reference's on the same images: the
    figures the export's gates and the device's self-test judge by."""
    difference = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    return {
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
        "top1_agreement": float(np.mean(predict_labels(candidate, threshold)
                                        == predict_labels(reference, threshold))),
    }


class RuntimeUnavailable(Exception):
    """The runtime asked for cannot be imported; the message is one line that says how to install
    it (the predictor exits EXIT_BAD_INPUT: edge.exit_codes)."""


@dataclass
class CpuModel:
    """A model loaded by one runtime: `run` takes a float32 (n, S, S, 3) batch of RGB 0-255 and
    returns the model's first output ([n, 1] or [n, classes] probabilities)."""

    runtime: str
    input_name: str
    output_name: str
    input_shape: list[int | None]  # None for a dynamic dimension (the batch)
    metadata: dict[str, str]  # the ONNX file's metadata_props
    run: Callable[[np.ndarray], np.ndarray]


def _onnxruntime_model(path: str, threads: int) -> CpuModel:
    session = cpu_session(path, threads)
    model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
    shape = [d if isinstance(d, int) else None for d in model_input.shape]

    def run(images: np.ndarray) -> np.ndarray:
        return session.run([model_output.name], {model_input.name: images})[0]

    return CpuModel("onnxruntime", model_input.name, model_output.name, shape,
                    dict(session.get_modelmeta().custom_metadata_map), run)


def _openvino_model(path: str, threads: int) -> CpuModel:
    """OpenVINO's CPU plugin tuned as cpu_session is: `threads` inference threads, one stream
    (the latency hint), and float32 arithmetic for float layers (on CPUs with bf16 or fp16 units it
    would otherwise use those, and the probabilities would drift from the export's)."""
    import openvino

    core = openvino.Core()
    model = core.read_model(path)
    metadata = {}
    if model.has_rt_info(["framework"]):  # where OpenVINO's ONNX reader keeps metadata_props
        framework = model.get_rt_info()["framework"]
        metadata = {key: str(framework[key].value) for key in framework}
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"})
    model_input, model_output = compiled.input(0), compiled.output(0)
    shape = [d.get_length() if d.is_static else None for d in model_input.get_partial_shape()]
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> np.ndarray:
        request.infer({0: images})
        return request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    return CpuModel("openvino", model_input.get_any_name(), model_output.get_any_name(), shape,
                    metadata, run)


class Runtime(NamedTuple):
    module: str  # the package it imports
    requirements: str  # the requirements file that installs it
    open: Callable[[str, int], CpuModel]


RUNTIMES = {
    "onnxruntime": Runtime("onnxruntime", "requirements-edge.txt", _onnxruntime_model),
    "openvino": Runtime("openvino", "requirements-openvino.txt", _openvino_model),
}
DEFAULT_RUNTIME = "onnxruntime"


def require_runtime(name: str) -> str:
    """The runtime's version; raises RuntimeUnavailable (one line: which runtime, how to install
    it) unless the runtime's package imports."""
    runtime = RUNTIMES[name]
    try:
        return __import__(runtime.module).__version__
    except ImportError as error:
        missing = isinstance(error, ModuleNotFoundError) and error.name == runtime.module
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200]
        reason = "is not installed" if missing else f"cannot be imported ({detail})"
        raise RuntimeUnavailable(f"runtime {name}: {runtime.module} {reason}; install it with "
                                 f"`pip install -r {runtime.requirements}`") from None


def open_model(path: Path | str, runtime: str = DEFAULT_RUNTIME,
               threads: int | None = None) -> CpuModel:
    """The model at path, loaded by `runtime` (a key of RUNTIMES) for the CPU with `threads`
    threads (default: every available core). Raises RuntimeUnavailable when the runtime's package
    cannot be imported; the runtime's own exception when the model cannot be loaded."""
    require_runtime(runtime)
    return RUNTIMES[runtime].open(str(path), threads or available_cores())
