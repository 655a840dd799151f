"""What a run prints: text or JSON lines as LOG_FORMAT says, TensorFlow's start-up lines held back,
a live progress bar only on a terminal with text logs."""
import contextlib
import io
import json
import logging
import os
import sys

import pytest

from common.quiet_start import NATIVE_LINE, quiet_native_startup
from edge import logs as edge_logs
from edge.logs import OWN_LOGGERS, JsonFormatter, choose_format, configure, fields, set_context
from tests.conftest import run_job

NATIVE = [b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
          b"I0000 00:00:1796164467.705782   24057 port.cc:153] oneDNN custom operations are on.\n",
          b"E0000 00:00:1796164471.680273   24057 cuda_platform.cc:52] failed call to cuInit\n"]


def write_to_fd2(lines):
    for line in lines:
        os.write(2, line)


def test_native_start_up_lines_are_dropped_and_other_lines_kept(capfd):
    environ = {}
    with quiet_native_startup(environ):
        write_to_fd2([NATIVE[0], b"Traceback (most recent call last):\n", *NATIVE[1:],
                      b"ValueError: a line of the job's own\n"])
    assert capfd.readouterr().err == ("Traceback (most recent call last):\n"
                                      "ValueError: a line of the job's own\n")
    assert environ["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_a_user_who_sets_tf_cpp_min_log_level_sees_every_line(capfd):
    with quiet_native_startup({"TF_CPP_MIN_LOG_LEVEL": "0"}):
        write_to_fd2(NATIVE)
    assert capfd.readouterr().err.encode() == b"".join(NATIVE)


def test_a_run_prints_no_native_line_before_its_own(tmp_path):
    result = run_job({"DATA_URI": str(tmp_path / "missing"), "OUTPUT_URI": str(tmp_path / "out"),
                      "CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines and all(" job: " in line for line in lines), lines[:5]
    assert not [line for line in lines if NATIVE_LINE.match(line.encode())]


def test_auto_writes_text_on_a_terminal_and_json_where_a_collector_reads_stderr():
    assert choose_format({}) == "text"
    assert choose_format({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "json"
    assert choose_format({"CLOUD_ML_JOB_ID": "123"}) == "json"
    assert choose_format({"LOG_FORMAT": "text", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "text"


def test_a_bad_log_format_is_one_line_naming_the_setting(tmp_path, main_in_process):
    result = main_in_process("job", {"LOG_FORMAT": "xml", "DATA_URI": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "LOG_FORMAT='xml' is not valid: expected one of auto, json, text" in result.stderr


def test_a_json_line_holds_severity_time_logger_context_and_fields():
    set_context(run_id="nightly")
    record = logging.LogRecord("job", logging.WARNING, __file__, 1, "epoch %d", (3,), None)
    record.__dict__.update(fields(epoch=3, metrics={"loss": 0.25}))
    entry = json.loads(JsonFormatter().format(record))
    assert entry["severity"] == "WARNING" and entry["message"] == "epoch 3"
    assert entry["logger"] == "job" and entry["run_id"] == "nightly"
    assert entry["epoch"] == 3 and entry["metrics"] == {"loss": 0.25}
    assert entry["time"].endswith("Z")


def test_every_line_of_a_json_run_parses_and_epochs_carry_their_metrics(vgg16_exported_by_job):
    # The shared VGG16 run (tests/conftest.py) logs JSON, its export too: the job's lines here.
    lines = (vgg16_exported_by_job.parent / "stderr.log").read_text().splitlines()
    entries = [entry for entry in map(json.loads, lines) if entry["logger"].split(".")[0] == "job"]
    assert entries and all(entry["run_id"] == "vgg16" for entry in entries)
    assert {entry["severity"] for entry in entries} <= {"INFO", "WARNING"}
    epochs = [entry for entry in entries if "epoch" in entry]
    assert [(entry["phase"], entry["epoch"]) for entry in epochs] == [("phase 2", 1)]
    assert isinstance(epochs[0]["metrics"]["val_loss"], float)
    probe = [entry for entry in entries if "linear probe" in entry["message"]]  # phase 1, solved
    assert probe[0]["phase"] == "phase 1" and probe[0]["metrics"]["C"] > 0
    scores = [entry for entry in entries if entry.get("split") == "validation"]
    assert len(scores) == 2 and 0 <= scores[-1]["metrics"]["accuracy"] <= 1


class FakeStderr(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@contextlib.contextmanager
def configured(environ):
    """edge.logs.configure(environ), undone afterwards: handlers, levels, warnings, the bar."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    own = {name: logging.getLogger(name).level for name in OWN_LOGGERS}
    try:
        configure(environ)
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, own_level in own.items():
            logging.getLogger(name).setLevel(own_level)
        logging.captureWarnings(False)
        edge_logs._live_progress = False


@pytest.mark.parametrize("terminal, environ, live", [
    (True, {"LOG_FORMAT": "text"}, True),
    (True, {}, True),  # auto: text here
    (True, {"LOG_FORMAT": "json"}, False),
    (True, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False),  # auto: json
    (False, {"LOG_FORMAT": "text"}, False),
])
def test_a_live_bar_is_allowed_only_on_a_terminal_with_text_logs(terminal, environ, live,
                                                                 monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeStderr(terminal))
    with configured(environ):
        assert edge_logs.live_progress() is live
