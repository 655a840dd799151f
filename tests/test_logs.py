"""What a run prints: TensorFlow's C++ start-up lines held back, everything else kept."""
import os

from job.logs import NATIVE_LINE, quiet_native_startup
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
