"""The project installs as a package: `pip wheel .` builds the shipped packages (job, export, edge,
storage, common) and their three console commands, and nothing of the tests, bench/, devkit/ or the
demo; the wheel installed elsewhere runs from any folder; and no script edits `sys.path`.

The wheel is built once for the module, from a copy of the checkout (a build in place would leave
build/ and *.egg-info in it), with the venv's own setuptools (`--no-build-isolation`: nothing is
downloaded).
"""
from __future__ import annotations

import configparser
import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SHIPPED = ("job", "export", "edge", "storage", "common")
NOT_SHIPPED = ("tests", "bench", "devkit", "demo")
COMMANDS = {"image-classifier-train": "job.__main__:cli",
            "image-classifier-export": "export.__main__:cli",
            "edge-predict": "edge.predict:main"}
LEFT_OUT_OF_THE_COPY = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                              ".pytest_cache", "outputs", "cache", "demo-run")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT_OF_THE_COPY)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-cache-dir", "--quiet", str(source), "-w", str(work / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = (work / "dist").glob("*.whl")
    return path


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_holds_the_entrypoints_of_the_job_the_export_and_the_predictor(wheel):
    assert {"job/__main__.py", "export/__main__.py", "edge/predict.py"} <= wheel_names(wheel)


def test_the_wheel_holds_every_module_of_the_shipped_packages_and_nothing_else(wheel):
    in_checkout = {path.relative_to(ROOT).as_posix() for package in SHIPPED
                   for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts}
    modules = {name for name in wheel_names(wheel) if name.endswith(".py")}
    assert modules == in_checkout
    assert not [name for name in wheel_names(wheel) if name.split("/")[0] in NOT_SHIPPED]


def test_the_wheel_declares_the_three_console_commands(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [name for name in archive.namelist() if name.endswith("/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(archive.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == COMMANDS


def test_each_console_command_names_a_main_function():
    for target in COMMANDS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed with pip into a folder of its own (--target)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--quiet",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    return target


def test_the_installed_wheel_imports_from_another_folder(installed, tmp_path):
    target = installed
    imported = subprocess.run(
        [sys.executable, "-c", "import job.__main__, export.__main__, edge.predict, storage, common;"
                               "print(job.__main__.__file__)"],
        cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}, capture_output=True, text=True,
        timeout=120)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert Path(imported.stdout.strip()) == target / "job" / "__main__.py"
    assert {"image-classifier-train", "image-classifier-export", "edge-predict"} <= {
        path.name for path in (target / "bin").iterdir()}


def test_the_installed_train_command_takes_flags(installed, tmp_path):
    """The console command passes its own flags on (`--help` here, which exits 0 before any
    TensorFlow import), as `python -m job` does."""
    helped = subprocess.run([str(installed / "bin" / "image-classifier-train"), "--help"],
                            cwd=tmp_path, env={"PYTHONPATH": str(installed), "PATH": ""},
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--fine-tune-epochs" in helped.stdout


def test_no_script_of_bench_or_tests_edits_sys_path():
    edit = re.compile(r"\bsys\.path\.(insert|append|extend)\(|\bsys\.path\s*[+]?=")
    scripts = [*ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("devkit/*.py")]
    assert [str(path.relative_to(ROOT)) for path in scripts if edit.search(path.read_text())] == []
