"""Quiet start: TensorFlow's C++ start-up lines kept off stderr (the log format is edge.logs').

TensorFlow's C++ layers print a dozen lines while it loads and looks for GPUs (oneDNN, the CUDA
stub, cuInit, absl's "All log messages before absl::InitializeLog()"). Since TensorFlow moved to
absl logging those lines come before absl is initialised, so TF_CPP_MIN_LOG_LEVEL no longer hides
them and no setting does; the only place to drop them is the process's own stderr. So, unless the
user set TF_CPP_MIN_LOG_LEVEL (then they see what they asked for), file descriptor 2 goes to a
temporary file while TensorFlow starts, and afterwards every line of it is written back except
those in the C++ log format. A Python traceback or any other line still reaches stderr.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator, MutableMapping

# absl/glog lines, "I0000 00:00:1796164467.705782   24057 port.cc:153] ...", and absl's notice.
NATIVE_LINE = re.compile(rb"^([IWEF]\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] |"
                         rb"WARNING: All log messages before absl::InitializeLog\(\))")


@contextlib.contextmanager
def quiet_native_startup(environ: MutableMapping[str, str]) -> Iterator[None]:
    """Inside the block, TensorFlow's C++ start-up lines are held back and dropped; every other
    line written to stderr is written out when the block ends. A no-op when the user set
    TF_CPP_MIN_LOG_LEVEL."""
    if "TF_CPP_MIN_LOG_LEVEL" in environ:
        yield
        return
    environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # what TensorFlow still honours: its later INFO lines
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held if not NATIVE_LINE.match(line)]
            if kept:
                os.write(2, b"".join(kept))
