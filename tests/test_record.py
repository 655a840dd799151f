"""The run record: what metrics.json tells the export about a run, typed and checked."""
import pytest

from common.record import RecordError, RunRecord

RECORD = {"run_id": "r1", "classes": ["cat", "dog"], "image_size": 150, "backbone": "vgg16",
          "alpha": 1.0, "dense_units": 256, "dropout": 0.5, "precision_policy": "mixed_float16",
          "seed": 42, "data_uri": "gs://bucket/images", "validation_split": 0.2,
          "test_split": 0.1, "decision_threshold": 0.37, "data_shards": 1}


def test_a_record_reads_back_what_was_written():
    record = RunRecord.from_metrics({"record": RECORD})
    assert record.as_dict() == RECORD and record.mixed_precision


def test_a_record_without_data_shards_is_of_a_run_on_one_worker():
    older = {key: value for key, value in RECORD.items() if key != "data_shards"}
    assert RunRecord.from_metrics({"record": older}).data_shards == 1
    assert RunRecord.from_metrics({"record": {**RECORD, "data_shards": 3}}).data_shards == 3


def test_a_run_written_before_the_record_is_read_from_its_config_block():
    config = {name: str(RECORD[name]) for name in (
        "image_size", "backbone", "alpha", "dense_units", "dropout", "seed", "data_uri",
        "validation_split", "test_split")}
    legacy = {"run_id": "r1", "config": config, "classes": ["cat", "dog"],
              "precision_policy": "mixed_float16", "decision_threshold": 0.37}
    assert RunRecord.from_metrics(legacy) == RunRecord.from_metrics({"record": RECORD})


@pytest.mark.parametrize("broken", [{"record": {**RECORD, "image_size": "large"}},
                                    {"record": {**RECORD, "classes": "cat,dog"}},
                                    {"record": {k: v for k, v in RECORD.items() if k != "seed"}},
                                    {"classes": ["cat", "dog"]}])
def test_an_incomplete_or_mistyped_record_is_one_record_error(broken):
    with pytest.raises(RecordError, match="no complete run record") as raised:
        RunRecord.from_metrics(broken)
    assert "\n" not in str(raised.value)
