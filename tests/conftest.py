"""Shared fixtures: paths to the real data in ../shared, temporary data trees, and servers on loopback."""


# --- Storage (job/storage.py): a GCS emulator on loopback and trees to move through it. ---
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import gcs_emulator  # noqa: E402


@pytest.fixture(scope="session")
def gcs_emulator_url():
    """A GCS-compatible server (gcp-storage-emulator) on a free loopback port, for the session."""
    with gcs_emulator.running() as url:
        yield url


@pytest.fixture
def gcs_endpoint(gcs_emulator_url, monkeypatch):
    """Points google-cloud-storage at the emulator, as STORAGE_EMULATOR_HOST does in a deployment."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator_url)
    return gcs_emulator_url


@pytest.fixture
def gcs_client(gcs_endpoint):
    from google.cloud import storage

    client = storage.Client(project="test-project")
    yield client
    client.close()


@pytest.fixture
def gcs_bucket(gcs_client):
    """The name of a new, empty bucket on the emulator."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    gcs_client.create_bucket(name)
    return name


@pytest.fixture
def faulty_gcs(gcs_endpoint, monkeypatch):
    """A proxy in front of the emulator that injects HTTP errors; the client goes through it."""
    with gcs_emulator.FaultyProxy(gcs_endpoint) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield proxy


@pytest.fixture
def file_tree(tmp_path):
    """A small directory tree of distinct binary files, nested like class folders."""
    root = tmp_path / "tree"
    for relative in ("NORMAL/a.jpeg", "NORMAL/b.jpeg", "PNEUMONIA/c.jpeg", "PNEUMONIA/sub/d.jpeg",
                     "labels.txt"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode() + uuid.uuid4().bytes * 50)
    return root

