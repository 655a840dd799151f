"""Run files: MANIFEST.json lists only the files that are complete."""
from common import run_files


def test_the_manifest_never_lists_a_temporary_or_partial_file(tmp_path):
    """A writer killed mid-file leaves such names; they are never part of the run."""
    (tmp_path / "saved_model").mkdir()
    for name in ("labels.txt", "saved_model/saved_model.pb",
                 "saved_model/saved_model.pb.tmp6f1c2d3e4b5a69788796a5b4c3d2e1f0",
                 "metrics.json.tmp", "model.keras.partial"):
        (tmp_path / name).write_bytes(b"x")
    assert set(run_files.write_manifest(tmp_path)["files"]) == {"labels.txt",
                                                                "saved_model/saved_model.pb"}
