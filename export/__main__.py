"""Entrypoint: `python -m export` converts one finished training run to ONNX and proves parity.

Settings come from the environment and flags (export/config.py; `--help` lists them). Exit codes:
0 every gate passed; 1 a parity gate failed (export_report.json, or export_report.failed.json
beside an earlier export, says which, by how much) or storage/conversion failed; 2 bad
configuration or input (no such run, an incomplete or damaged run, its data missing, a target that
belongs to another run), or a full disk (storage/diskspace.py).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, Sequence

from common.quiet_start import quiet_native_startup
from edge import logs
from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK


def main(environ: Mapping[str, str] = os.environ, argv: Sequence[str] = ()) -> int:
    """One export, configured by environ and the flags in argv (`--help`: every setting)."""
    from common import settings
    from common.settings import ConfigError
    from export.config import PROG, ExportConfig
    from export.errors import ExportError

    if settings.wants_help(argv):
        print(settings.help_text(ExportConfig, PROG), end="")
        return EXIT_OK
    log = logging.getLogger("export")
    try:
        logs.configure(environ)
        config = ExportConfig.from_env(environ, argv)
    except (logs.LogFormatError, ConfigError) as error:
        log.error("configuration error: %s", error)
        return EXIT_BAD_INPUT
    logs.set_context(run_uri=config.run_uri)

    with quiet_native_startup(os.environ):  # TensorFlow reads the process's own environment
        import tensorflow  # noqa: F401  (its C++ start-up lines are printed on import)
    from export import pipeline
    from storage import StorageError, diskspace

    try:
        pipeline.export_run(config)
    except Exception as error:
        # A full disk first, whichever library met it and whatever error the export made of it.
        full = diskspace.from_error(error, where=config.cache_dir)
        if full is not None:
            log.error("%s", full)
            return EXIT_BAD_INPUT
        if isinstance(error, ExportError):
            log.error("%s: %s", error.__class__.__name__, error)
            return error.exit_code
        if isinstance(error, StorageError):
            log.error("storage error: %s", error)
            return EXIT_FAILED
        raise  # unexpected: the traceback
    return EXIT_OK


def cli() -> int:
    """The console command (pyproject's [project.scripts]): this process's environment and flags."""
    return main(os.environ, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(cli())
