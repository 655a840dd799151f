"""The images' recipes, replayed without Docker: a fresh virtual environment gets exactly the
Dockerfile stage's pip commands, the stage's COPYs are laid out under a temporary WORKDIR, and the
ENTRYPOINT runs there with the stage's ENV, overridden only by what `docker run -e` would pass.

What is not replayed, and why: the base image itself (this interpreter stands in for it; its
major.minor must equal the base image tag's), the non-root user (needs root; infra/ checks
runAsNonRoot), and the CUDA layer (`--no-deps -r requirements-gpu.txt`: NVIDIA libraries only,
which change no Python dependency and need a GPU to be exercised). pip's cache is left on, unlike
in the image (PIP_NO_CACHE_DIR there keeps layers small), so a second run does not download again;
and pip does not byte-compile what it installs (--no-compile): the image's .pyc files only make
its imports faster, and compiling TensorFlow's took a third of the replay's install.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import dockerfile_recipe as recipe

ROOT = recipe.ROOT
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
CUDA_LAYER = "--no-deps -r /tmp/requirements/requirements-gpu.txt"
# Written into the image by the Dockerfile's ENV but, in a container, also paths on its own file
# system: the replay points them into its temporary root instead.
CONTAINER_PATHS = ("CACHE_DIR", "KERAS_HOME", "MPLCONFIGDIR", "OUTPUT_URI")
# Every test here installs a virtual environment or resolves the lock with pip: minutes.
pytestmark = pytest.mark.slow


def replay(stage: str, root: Path) -> tuple[Path, dict[str, str], Path]:
    """Builds `stage` under root: returns (WORKDIR, environment, venv)."""
    instructions = recipe.chain(stage)
    tag = recipe.base_image(stage).split(":", 1)[1]
    assert tag.startswith("%d.%d." % sys.version_info[:2]), \
        f"base image {tag} is not this interpreter's Python {sys.version.split()[0]}"

    venv = root / "venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    fs = root / "fs"  # the container's file system, for the paths the recipe names
    for sources, destination in recipe.copies(instructions):
        target = fs / destination.lstrip("/")
        for source in sources:
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target / Path(source).name)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(root / "home"), "LANG": "C.UTF-8"}
    env.update(recipe.env(instructions))
    env.pop("PIP_NO_CACHE_DIR", None)
    (root / "home").mkdir()

    pip_runs = [rest for instruction, rest in instructions
                if instruction == "RUN" and "pip install" in rest]
    assert pip_runs, f"no pip install in stage {stage}"
    for command in pip_runs:
        if CUDA_LAYER in command:
            continue
        command = command.replace("--no-cache-dir ", "--no-compile ").replace("/tmp/", f"{fs}/tmp/")
        result = subprocess.run(["sh", "-c", command], env={**os.environ, **env}, cwd=root,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    workdir = fs / recipe.last(instructions, "WORKDIR").lstrip("/")
    for name in CONTAINER_PATHS:
        if name in env:
            env[name] = str(fs / env[name].lstrip("/"))
    return workdir, env, venv


@pytest.mark.timeout(900)
def test_training_image_recipe_trains_a_tiny_run_to_a_manifest(tmp_path, tiny_image_tree):
    workdir, env, venv = replay("train", tmp_path)
    # What the ENTRYPOINT gets from the Job's ConfigMap, `docker run -e` style.
    env.update(DATA_URI=str(tiny_image_tree), RUN_ID="replay", BACKBONE="vgg16", WEIGHTS="none",
               IMAGE_SIZE="32", HEAD_EPOCHS="1", FINE_TUNE_EPOCHS="1", BATCH_SIZE="8",
               CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    entrypoint = recipe.entrypoint(recipe.chain("train"))
    assert entrypoint == ["python", "-m", "job"]
    result = subprocess.run(entrypoint, cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = Path(env["OUTPUT_URI"]) / "replay"
    manifest = json.loads((run_dir / "MANIFEST.json").read_text())
    assert manifest
    assert (run_dir / "labels.txt").read_text().split() == ["cats", "dogs"]
    assert (run_dir / "saved_model").is_dir()
    # The job ran from the image's copy of the code, in the fresh environment, not this checkout.
    assert not (workdir / "job" / "__pycache__").exists()  # PYTHONDONTWRITEBYTECODE from ENV
    versions = json.loads((run_dir / "metrics.json").read_text())["versions"]
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert versions["tensorflow"] == pins["tensorflow"] and versions["keras"] == pins["keras"]


@pytest.fixture(scope="session")
def edge_image(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """The edge stage replayed once for the tests that read it: (WORKDIR, environment, venv)."""
    return replay("edge", tmp_path_factory.mktemp("edge-image"))


@pytest.mark.timeout(300)
def test_edge_image_recipe_installs_its_lock_and_imports_without_tensorflow(edge_image):
    workdir, env, venv = edge_image
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                               env=env, capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(installed)}
    assert {"onnxruntime", "numpy", "pillow"} <= names
    assert not {n for n in names if n.startswith(("tensorflow", "keras", "tf-"))}
    probe = ("import sys, edge.images; import onnxruntime, numpy, PIL; "
             "assert 'tensorflow' not in sys.modules; print(edge.images.__file__)")
    result = subprocess.run(["python", "-c", probe], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(workdir))


@pytest.mark.timeout(300)
def test_edge_image_entrypoint_starts_without_tensorflow(edge_image):
    workdir, env, venv = edge_image
    entrypoint = recipe.entrypoint(recipe.chain("edge"))
    assert entrypoint == ["python", "-m", "edge.predict"]
    result = subprocess.run([*entrypoint, "--help"], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.timeout(300)
def test_gpu_layer_pins_are_what_tensorflow_and_cuda_resolves_to(tmp_path):
    """The CUDA layer is not installed here (3 GB, and no GPU to run it), but pip's resolver proves
    that requirements.txt + requirements-gpu.txt satisfy `tensorflow[and-cuda]==2.21.0` for this
    Python and platform, with nothing else added or changed."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "-r", str(ROOT / "requirements.txt"),
         "-r", str(ROOT / "requirements-gpu.txt"), "tensorflow[and-cuda]==2.21.0"],
        capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {_norm(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    pins = {**_pins(ROOT / "requirements.txt"), **_pins(ROOT / "requirements-gpu.txt")}
    # Build tools that TensorFlow and astunparse require but the runtime lock leaves to the base
    # image and venv (both ship them): reported, not pinned here.
    unpinned = set(resolved) - set(pins)
    assert unpinned <= {"setuptools", "wheel"}, unpinned
    assert {name: resolved[name] for name in pins} == pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_norm(name)] = version
    return pins
