"""CURRENT.json's switch (job/promotion/pointer.py): replaced only when unchanged since it was read."""
import threading

import pytest

from job.promotion import pointer


@pytest.fixture(params=["local", "gcs"])
def pointer_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "promote" / "CURRENT.json")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"gs://{bucket}/promote/CURRENT.json"


def test_a_pointer_is_written_when_unchanged_since_it_was_read(pointer_uri):
    data, token = pointer.read(pointer_uri)
    assert data is None
    assert pointer.replace(pointer_uri, b'{"run_id": "a"}', token)
    data, token = pointer.read(pointer_uri)
    assert data == b'{"run_id": "a"}'
    assert pointer.replace(pointer_uri, b'{"run_id": "b"}', token)
    assert pointer.read(pointer_uri)[0] == b'{"run_id": "b"}'


def test_a_pointer_changed_since_it_was_read_is_not_overwritten(pointer_uri):
    _, first_seen = pointer.read(pointer_uri)
    assert pointer.replace(pointer_uri, b'{"run_id": "winner"}', first_seen)
    assert not pointer.replace(pointer_uri, b'{"run_id": "loser"}', first_seen)
    assert pointer.read(pointer_uri)[0] == b'{"run_id": "winner"}'


def test_racing_writers_that_read_the_same_version_leave_exactly_one_winner(pointer_uri):
    _, token = pointer.read(pointer_uri)
    results = {}
    start = threading.Barrier(4)

    def write(name):
        start.wait()
        results[name] = pointer.replace(pointer_uri, f'{{"run_id": "{name}"}}'.encode(), token)

    threads = [threading.Thread(target=write, args=(f"run{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, won in results.items() if won]
    assert len(winners) == 1
    assert pointer.read(pointer_uri)[0] == f'{{"run_id": "{winners[0]}"}}'.encode()
