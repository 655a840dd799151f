"""RunRecord: what a finished run tells the programs that use it, in metrics.json under "record".

The export rebuilds the classifier in float32, re-splits the run's data exactly as training did
and gates the ONNX models at the run's decision threshold; this record is everything it needs of
the run, typed and checked in one place, so nothing downstream reads metrics.json as a loose dict.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

KEY = "record"  # its key in metrics.json


class RecordError(ValueError):
    """metrics.json holds no usable record of the run."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    run_id: str
    classes: list[str]
    image_size: int
    backbone: str
    alpha: float
    dense_units: int
    dropout: float
    precision_policy: str  # "float32", "mixed_float16" or "mixed_bfloat16"
    seed: int
    data_uri: str
    validation_split: float
    test_split: float
    decision_threshold: float  # two classes: label 1 when p >= this; 0.5 otherwise
    data_shards: int = 1  # workers that each loaded one shard of the data (job/inputs/shard.py)

    @property
    def mixed_precision(self) -> bool:
        return self.precision_policy.startswith("mixed")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of_run(cls, settings: Mapping[str, Any], classes: list[str], precision_policy: str,
               decision_threshold: float, data_shards: int = 1) -> "RunRecord":
        """The record of a run from its settings (the Config as a dict, as metrics.json's
        "config" block holds it) and what the run found."""
        return cls(**{name: settings[name] for name in SETTINGS}, classes=classes,
                   precision_policy=precision_policy, decision_threshold=decision_threshold,
                   data_shards=data_shards)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> "RunRecord":
        """The record in a run's metrics.json. Runs written before the record existed carry
        the same facts in their "config" block, so those are read from there."""
        try:
            fields = {"data_shards": 1,  # runs from before the cluster shared the data
                      **(metrics.get(KEY) or _from_config_block(metrics))}
            return cls(**{field.name: _typed(field, fields[field.name])
                          for field in dataclasses.fields(cls)})
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise RecordError(f"no complete run record ({error.__class__.__name__}: {error})") \
                from None


def _typed(field: dataclasses.Field, value: Any) -> Any:
    kind = {"int": int, "float": float, "str": str}.get(str(field.type))
    if kind:
        return kind(value)
    if not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
        raise TypeError(f"{field.name} is not a list of names")
    return list(value)


def _from_config_block(metrics: Mapping[str, Any]) -> dict[str, Any]:
    settings = {**metrics["config"], "run_id": metrics.get("run_id", "")}
    return RunRecord.of_run(settings, metrics["classes"],
                            metrics.get("precision_policy", "float32"),
                            metrics.get("decision_threshold", 0.5)).as_dict()


# What the run found; every other field is one of its settings, under the same name in Config.
RESULTS = ("classes", "precision_policy", "decision_threshold", "data_shards")
SETTINGS = tuple(field.name for field in dataclasses.fields(RunRecord) if field.name not in RESULTS)
