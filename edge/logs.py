"""Logs: one line per event on stderr, as text for a person or as JSON for a log collector.

LOG_FORMAT=json writes one JSON object per line in the form Google Cloud Logging parses into
jsonPayload and severity (and `kubectl logs | jq` reads): "severity", "message", "time" (RFC 3339,
UTC), "logger", the run's context (set once, e.g. run_id) and what a line adds (phase, epoch,
metrics as numbers). LOG_FORMAT=text writes "time LEVEL logger: message". LOG_FORMAT=auto, the
default, chooses json where a collector reads stderr (Kubernetes, Vertex AI, Cloud Run jobs: their
environment variables say so) and text elsewhere. The job, the export and the predictor all log
through here, and Python warnings become log lines too, so in json every line of stderr parses.

LOG_FORMAT is read by the entrypoints before their other settings: logging has to exist first,
so that a bad setting is reported in the format the collector expects. configure also decides,
once, whether long steps may draw a live progress bar (live_progress): only in text on a terminal.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Mapping

FORMATS = ("auto", "json", "text")
# Set in the containers of a Kubernetes pod, of a Vertex AI custom job (CLUSTER_SPEC on every
# replica, CLOUD_ML_JOB_ID) and of a Cloud Run job.
COLLECTOR_VARIABLES = ("KUBERNETES_SERVICE_HOST", "CLUSTER_SPEC", "CLOUD_ML_JOB_ID",
                       "CLOUD_RUN_JOB")
OWN_LOGGERS = ("job", "export", "edge", "storage", "common")  # from INFO; libraries from WARNING
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = "fields"  # a record's attribute holding its structured fields; see fields()

_context: dict[str, Any] = {}  # on every JSON line; filled once per process by set_context
_live_progress = False  # set by configure: stderr is a terminal and the format is text


class LogFormatError(ValueError):
    """LOG_FORMAT names no format."""


def choose_format(environ: Mapping[str, str]) -> str:
    """"json" or "text", as LOG_FORMAT (auto, json or text) asks."""
    value = environ.get("LOG_FORMAT", "auto").strip().lower() or "auto"
    if value not in FORMATS:
        raise LogFormatError(f"LOG_FORMAT={value!r} is not valid: expected one of "
                             f"{', '.join(FORMATS)}")
    if value != "auto":
        return value
    return "json" if any(environ.get(name) for name in COLLECTOR_VARIABLES) else "text"


def configure(environ: Mapping[str, str]) -> None:
    """Sends every log line to stderr in the format LOG_FORMAT chooses. Raises LogFormatError
    for a bad LOG_FORMAT, after setting up text logs to report it in."""
    global _live_progress
    _live_progress = False
    try:
        chosen = choose_format(environ)
    except LogFormatError:
        _install(logging.Formatter(TEXT_FORMAT))
        raise
    _install(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    _live_progress = chosen == "text" and _is_terminal(sys.stderr)


def live_progress() -> bool:
    """Whether a long step may draw a live progress bar on stderr (common.progress): configure found
    stderr a terminal and the format text. False before configure, in json, and off a terminal."""
    return _live_progress


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a line is written, not on the one there at
    start-up: while a live progress bar is drawn, rich points sys.stderr at a proxy that prints
    each line above the bar, so log lines and the bar do not overwrite each other."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def _install(formatter: logging.Formatter) -> None:
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # a Python warning is a WARNING line, not loose text


def set_context(**values: Any) -> None:
    """Fields every later JSON line carries, such as the run's id."""
    _context.update(values)


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """A log call's structured fields: log.info("...", extra=fields(epoch=3, metrics={...}))."""
    return {FIELDS: values}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, in Cloud Logging's structured-logging form."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        time = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry = {"severity": record.levelname, "message": message,
                 "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "logger": record.name, **_context, **getattr(record, FIELDS, {})}
        return json.dumps(entry, default=str)
