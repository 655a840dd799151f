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


def test_a_write_conditional_on_a_generation_lands_only_while_that_generation_is_live(gcs_bucket):
    uri = f"gs://{gcs_bucket}/folder/claim.json"
    first = objects.write(uri, b"one", if_generation=0)
    assert first and objects.write(uri, b"two", if_generation=0) is None
    second = objects.write(uri, b"two", if_generation=first)
    assert second and second != first
    assert objects.write(uri, b"three", if_generation=first) is None
    assert objects.read_version(uri) == (b"two", second)


def test_a_refused_write_that_finds_exactly_its_bytes_is_taken_as_its_own(gcs_bucket):
    """As a retried request whose first attempt had landed: its condition no longer holds."""
    uri = f"gs://{gcs_bucket}/folder/CURRENT.json"
    landed = objects.write(uri, b'{"run_id": "a"}', if_generation=0)
    assert objects.write(uri, b'{"run_id": "a"}', if_generation=0, retried_is_ours=True) == landed
    assert objects.write(uri, b'{"run_id": "b"}', if_generation=0, retried_is_ours=True) is None


def test_a_write_keeps_the_content_type_asked_for(gcs_bucket, gcs_client):
    objects.write(f"gs://{gcs_bucket}/folder/CURRENT.json", b"{}", content_type="application/json")
    blob = gcs_client.bucket(gcs_bucket).get_blob("folder/CURRENT.json")
    assert blob.content_type == "application/json"


def test_delete_if_deletes_only_the_generation_named(gcs_bucket):
    uri = f"gs://{gcs_bucket}/folder/claim.json"
    first = objects.write(uri, b"one")
    second = objects.write(uri, b"two", if_generation=first)
    assert not objects.delete_if(uri, first)
    assert objects.read(uri) == b"two"
    assert objects.delete_if(uri, second)
    assert objects.read_version(uri) is None
    assert not objects.delete_if(uri, second)


def test_generations_are_asked_of_gs_objects_only(tmp_path):
    with pytest.raises(ValueError, match="a local path has none"):
        objects.read_version(str(tmp_path / "claim.json"))
