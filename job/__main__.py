"""Entrypoint: `python -m job` reads its settings from the environment and flags (job/config.py)
and runs one training job; `python -m job --help` lists them.

Exit codes: 0 done (or the run was already complete), 1 unexpected or storage failure,
2 bad configuration or bad input, a full disk (storage/diskspace.py) or another process writing the
same run (job/results/writer.py): retrying cannot help; 75 stopped by SIGTERM with a checkpoint saved (run
again with the same RUN_ID to resume). With PROMOTE_URI, a run held back by the promotion rule
exits 0: its verdict is OUTPUT_URI/RUN_ID/promotion.json (docs/promotion.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from common.quiet_start import quiet_native_startup
from edge import logs
from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

TERMINATION_LOG = Path("/dev/termination-log")  # Kubernetes' terminationMessagePath default


def main(environ: Mapping[str, str] = os.environ, argv: Sequence[str] = ()) -> int:
    """One run, configured by environ and the flags in argv (`--help`: every setting)."""
    from common import settings
    from job.config import PROG, Config, ConfigError

    if settings.wants_help(argv):
        print(settings.help_text(Config, PROG), end="")
        return EXIT_OK
    try:
        logs.configure(environ)
        config = Config.from_env(environ, argv)
        export_config = _export_config(config, environ) if config.export_onnx else None
    except (logs.LogFormatError, ConfigError) as error:
        return _fail(f"configuration error: {error}", EXIT_BAD_INPUT)
    logs.set_context(run_id=config.run_id)

    start_tensorflow()
    from export.errors import ExportError
    from job.cluster.context import RunContext
    from job.inputs.data import DataError
    from job.training import setup, train
    from job.training.checkpoint import Preempted, StopSignal
    from storage import StorageError, Unusable, diskspace

    stop = StopSignal()
    stop.install()
    try:
        context = RunContext.create(config)  # the strategy: before any other TensorFlow op
        setup.validate(config, context)
        with claimed(config, context) as context:  # one writer per run, released however it ends
            metrics = train.run(config, context, stop)
        gate_failure = None
        if export_config and metrics.get("status") != train.ALREADY_COMPLETE:
            gate_failure = export_after_run(export_config, promoting=bool(config.promote_uri))
        if config.promote_uri and context.chief:
            record = promote_after_run(config, context, export_config)
            if gate_failure and record.get("onnx_float32") != "passed":  # held back, and failed
                raise gate_failure
    except Preempted as error:
        return _fail(f"preempted: {error}; exit {EXIT_PREEMPTED}, rerun with RUN_ID={config.run_id} "
                     "to resume", EXIT_PREEMPTED)
    except (ConfigError, DataError, setup.SetupError) as error:
        return _fail(f"{error.__class__.__name__}: {error}", EXIT_BAD_INPUT)
    except Unusable as error:
        return _fail(f"storage: {error}", EXIT_BAD_INPUT)
    except StorageError as error:
        return _fail(f"storage error: {error}", EXIT_FAILED)
    except Exception as error:  # a full disk, whichever library met it; anything else below
        full = diskspace.from_error(error, where=config.cache_dir)
        if full is not None:
            return _fail(f"{full}; then rerun with RUN_ID={config.run_id} to resume",
                         EXIT_BAD_INPUT)
        if isinstance(error, ExportError):  # EXPORT_ONNX=1: the run is complete, its export not
            return _fail(f"ONNX export: {error.__class__.__name__}: {error}", error.exit_code)
        raise  # unexpected: the traceback
    return EXIT_OK


@contextlib.contextmanager
def claimed(config, context):
    """The context, holding the chief's claim on the run while the block runs (job/results/writer.py)."""
    from job.results import writer

    if not context.chief:  # the others write nothing of the run
        yield context
        return
    with writer.claimed(config.run_uri, retry_deadline=config.storage_deadline) as claim:
        yield dataclasses.replace(context, claim=claim)


def start_tensorflow() -> None:
    """Imports TensorFlow and lets it look for GPUs, its C++ start-up lines held back
    (common.quiet_start.quiet_native_startup); a no-op once it has run."""
    with quiet_native_startup(os.environ):  # TensorFlow reads the process's own environment
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # where the CUDA libraries announce themselves


def _export_config(config, environ):
    """With EXPORT_ONNX=1, the export's settings (OPSET, INT8, EXPORT_URI, ...) from the same
    environment, checked before training: the run to export is this one, in its cache, and the
    data is the run's own (recorded in its metrics.json), so DATA_URI is not passed on."""
    from export.config import ExportConfig

    return ExportConfig.from_env({**{k: v for k, v in environ.items() if k != "DATA_URI"},
                                  "RUN_URI": config.run_uri, "CACHE_DIR": str(config.cache_dir)})


def export_after_run(export_config, promoting: bool):
    """The ONNX export beside the SavedModel, gated. When promoting, a failed gate is returned
    rather than raised: promotion decides what it holds back (docs/promotion.md)."""
    from export.errors import GateFailed
    from export.pipeline import export_run

    try:
        export_run(export_config)
    except GateFailed as error:
        if not promoting:
            raise
        return error
    return None


def promote_after_run(config, context, export_config) -> dict:
    """PROMOTE_URI: this run against the production model (job/promotion/promote.py), unless a rerun finds
    the verdict already recorded; then the decoded test images it read are removed."""
    import shutil

    from job.promotion import promote

    if promote.already_recorded(config):
        return {}
    record = promote.promote_run(config, context.scratch_dir,
                                 export_config.target_uri if export_config else None)
    shutil.rmtree(context.scratch_dir, ignore_errors=True)
    if TERMINATION_LOG.exists():  # the verdict as the pod's termination message (infra/README)
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(f"{record['status']}: {record['reason']}"[:4096])
    return record


def _fail(message: str, code: int) -> int:
    logging.getLogger("job").error(message)
    return code


def cli() -> int:
    """The console command (pyproject's [project.scripts]): this process's environment and flags."""
    return main(os.environ, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())
