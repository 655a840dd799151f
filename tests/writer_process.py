"""One writer of a run for the concurrency tests (tests/test_writers.py), as the job's chief is one.

    [STORAGE_EMULATOR_HOST=...] python -m tests.writer_process RUN_URI STAGING NAME TRAIN_S WAIT_S

Claims the run (job.results.writer), "trains" for TRAIN_S seconds, writes a small run of its own (NAME in
every file) into a fresh STAGING folder with its MANIFEST.json, and publishes it. Ends as
`python -m job` does: exit 0 with "published" or "already complete" on stdout; exit 2 with one
line on stderr when the run is another writer's; exit 75 on SIGTERM, having released its claim.
"""
import logging
import os
import signal
import sys
import time
from pathlib import Path

import storage
from common import run_files
from job.results import writer

RUN_FILES = ("metrics.json", "labels.txt", "model.keras", "report.html",
             "saved_model/saved_model.pb", "saved_model/variables/variables.index",
             "saved_model/variables/variables.data-00000-of-00001")


class Preempted(Exception):
    """SIGTERM, raised where the main thread is, as job.training.checkpoint.StopSignal does."""


def stop(signum, frame):
    raise Preempted()


def write_run(folder: Path, name: str) -> None:
    for relative in RUN_FILES:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{name} {relative}\n".encode() + os.urandom(2000))
    run_files.write_manifest(folder)


def main(run_uri: str, staging: str, name: str, train_s: float, wait_s: float) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, stop)
    try:
        with writer.claimed(run_uri, wait_s=wait_s, stale_after_s=wait_s / 2, heartbeat_s=0.5,
                            poll_s=0.1, retry_deadline=30) as claim:
            if claim is None:
                print("already complete", flush=True)
                return 0
            print("claimed", flush=True)
            time.sleep(train_s)
            folder = writer.fresh_staging(Path(staging))
            write_run(folder, name)
            writer.publish(claim, folder, run_uri, retry_deadline=30)
            print("published", flush=True)
            return 0
    except storage.Unusable as error:
        logging.getLogger("job").error("storage: %s", error)
        return 2
    except Preempted:
        logging.getLogger("job").error("preempted")
        return 75


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])))
