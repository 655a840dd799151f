"""docs/settings.md, generated from the settings tables of the job (job/config.py) and the export
(export/config.py); `python -m devkit.settings_doc` writes it, and tests/test_settings.py checks
that the committed page is what this makes."""
from __future__ import annotations

from pathlib import Path

from common import settings
from export.config import ExportConfig
from job.config import Config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
COMMAND = "python -m devkit.settings_doc"


def page() -> str:
    return f"""# Settings

<!-- Generated from job/config.py and export/config.py by `{COMMAND}`: edit those,
     then run it. tests/test_settings.py fails while this page differs from what it makes. -->

Every setting is an environment variable or a flag: `FINE_TUNE_EPOCHS=3`, `--fine-tune-epochs 3`,
`--fine_tune_epochs=3` and `--FINE_TUNE_EPOCHS=3` are alike, and a flag beats the variable. A bad
value, a missing required setting or an unknown flag exits 2 with one line naming it.
`python -m job --help` and `python -m export --help` print these tables as text.

Also read from the environment only: `LOG_FORMAT` (`json`, `text` or `auto`, the default: json on
Kubernetes, Vertex AI and Cloud Run jobs, text elsewhere; for the job, the export and the
predictor) and `STORAGE_EMULATOR_HOST` (point the Cloud Storage client at an emulator,
`http://host:port`).

## Training job (`python -m job`)

{settings.markdown(Config)}
## ONNX export (`python -m export`)

With `EXPORT_ONNX=1` the training job runs this export at its end, reading these settings from the
environment (the run to export is its own; `DATA_URI` is the run's).

{settings.markdown(ExportConfig)}"""


def main() -> None:
    PAGE.write_text(page())
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
