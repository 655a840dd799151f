"""Shared fixtures: paths to the real data in ../shared, temporary data trees, and servers on loopback."""


# --- infra: containers, manifests, multi-worker training (branch infra) -------------------------
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def free_ports():
    """free_ports(n): n distinct TCP ports on 127.0.0.1 that were free a moment ago."""

    def pick(n: int) -> list[int]:
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            return [s.getsockname()[1] for s in sockets]
        finally:
            for s in sockets:
                s.close()

    return pick


@pytest.fixture
def tiny_image_tree(tmp_path):
    """A few dozen tiny generated PNGs in two class folders (cats/, dogs/): a dark and a light
    class with noise, so a model can learn something in one epoch."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label, base in (("cats", 60), ("dogs", 190)):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(16):
            pixels = np.clip(base + rng.normal(0, 25, size=(40, 40, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{label}_{i:02d}.png")
    return root


@pytest.fixture
def cpu_subprocess_env():
    """Environment for TensorFlow child processes: CPU only, quiet, unbuffered, this repo first."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CONFIG", "CLUSTER_SPEC"))}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO_ROOT))
    return env
