"""Entrypoint: `python -m job` reads its settings from the environment and runs one training job.

Exit codes: 0 done (or the run was already complete), 1 unexpected or storage failure,
2 bad configuration or bad input (retrying cannot help), 75 stopped by SIGTERM with a checkpoint
saved (run again with the same RUN_ID to resume).
"""
from __future__ import annotations

import logging
import os
import sys

from job import configure_logging

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def main(environ=os.environ) -> int:
    configure_logging()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from job.config import Config, ConfigError

    try:
        config = Config.from_env(environ)
    except ConfigError as error:
        return _fail(f"configuration error: {error}", EXIT_BAD_INPUT)

    from job import train
    from job.checkpoint import EXIT_PREEMPTED, Preempted, StopSignal
    from job.data import DataError
    from job.storage import StorageError, Unusable
    from export.errors import ExportError

    stop = StopSignal()
    stop.install()
    try:
        train.validate(config)
        train.run(config, stop)
    except Preempted as error:
        return _fail(f"preempted: {error}; exit {EXIT_PREEMPTED}, rerun with RUN_ID={config.run_id} "
                     "to resume", EXIT_PREEMPTED)
    except (ConfigError, DataError, train.SetupError) as error:
        return _fail(f"{error.__class__.__name__}: {error}", EXIT_BAD_INPUT)
    except Unusable as error:
        return _fail(f"storage: {error}", EXIT_BAD_INPUT)
    except StorageError as error:
        return _fail(f"storage error: {error}", EXIT_FAILED)
    except ExportError as error:  # EXPORT_ONNX=1: the run is complete, its export is not
        return _fail(f"ONNX export: {error.__class__.__name__}: {error}", error.exit_code)
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    logging.getLogger("job").error(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
