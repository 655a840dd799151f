"""Cache dir: the default of CACHE_DIR, the local folder the job, the export and the rollback
command pull data, weights and runs into and keep their scratch in (storage marks it as theirs)."""
from pathlib import Path

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "image-classifier-job"
