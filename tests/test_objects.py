"""storage.objects: single files, local and on the emulator, written and deleted on a condition."""
from __future__ import annotations

import hashlib

import pytest

from storage import join, objects


@pytest.fixture(params=["local", "gs"])
def folder(request, tmp_path) -> str:
    """An empty folder: a local path, or a prefix in a new bucket on the emulator."""
    if request.param == "local":
        return str(tmp_path / "folder")
    return f"gs://{request.getfixturevalue('gcs_bucket')}/folder"


def staged(tmp_path, text: str):
    path = tmp_path / f"staged-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    path.write_text(text)
    return path


def test_a_put_file_reads_back_and_a_missing_one_reads_none(folder, tmp_path):
    objects.put(staged(tmp_path, "one"), join(folder, "a.json"))
    assert objects.read(join(folder, "a.json")) == b"one"
    assert objects.read(join(folder, "b.json")) is None


def test_put_replaces_but_an_exclusive_put_refuses_a_taken_name(folder, tmp_path):
    objects.put(staged(tmp_path, "one"), join(folder, "a.json"), exclusive=True)
    objects.put(staged(tmp_path, "two"), join(folder, "a.json"))
    with pytest.raises(objects.Exists, match="a.json: already exists"):
        objects.put(staged(tmp_path, "three"), join(folder, "a.json"), exclusive=True)
    assert objects.read(join(folder, "a.json")) == b"two"


def test_delete_if_unchanged_deletes_only_the_bytes_proved(folder, tmp_path):
    objects.put(staged(tmp_path, "mine"), join(folder, "a.onnx"))
    assert not objects.delete_if_unchanged(join(folder, "a.onnx"),
                                           hashlib.sha256(b"other").hexdigest())
    assert objects.read(join(folder, "a.onnx")) == b"mine"
    assert objects.delete_if_unchanged(join(folder, "a.onnx"), hashlib.sha256(b"mine").hexdigest())
    assert objects.read(join(folder, "a.onnx")) is None
    assert not objects.delete_if_unchanged(join(folder, "a.onnx"),
                                           hashlib.sha256(b"mine").hexdigest())
