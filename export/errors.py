"""Errors of the export, each carrying the exit code the entrypoint returns for it."""
from __future__ import annotations

from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED


class ExportError(Exception):
    """The export could not finish; `exit_code` says whether retrying can help."""

    exit_code = EXIT_FAILED


class BadInput(ExportError):
    """A setting, the run directory or its data cannot be used (exit 2; retrying cannot help)."""

    exit_code = EXIT_BAD_INPUT


class GateFailed(ExportError):
    """A parity gate failed (exit 1); export_report.json was still written, marked failed."""

    exit_code = EXIT_FAILED
