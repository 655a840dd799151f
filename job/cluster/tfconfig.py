"""TF_CONFIG for a worker of a Kubernetes Indexed Job, then the command it wraps.

    python -m job.cluster.tfconfig python -m job

Every pod of an Indexed Job with `subdomain: <service>` (a headless Service) is reachable as
<job-name>-<index>.<service>; this builds the cluster from those names (all workers, worker 0 the
chief) and this pod's task from JOB_COMPLETION_INDEX, sets TF_CONFIG and execs the command.

Variables (infra/base/multiworker.yaml sets them): TFCONFIG_JOB_NAME (the Job's name),
TFCONFIG_SERVICE (the headless Service), TFCONFIG_WORKERS (= the Job's completions),
TFCONFIG_PORT (default 2222), JOB_COMPLETION_INDEX (set by Kubernetes).
A missing or bad value exits with code 2, like the job's own configuration errors.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

from edge.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED


def build_tf_config(job_name: str, service: str, workers: int, index: int, port: int = 2222) -> str:
    if workers < 1 or not 0 <= index < workers:
        raise ValueError(f"worker index {index} is not in 0..{workers - 1}")
    hosts = [f"{job_name}-{i}.{service}:{port}" for i in range(workers)]
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


def tf_config_from_env(environ: Mapping[str, str]) -> str:
    try:
        return build_tf_config(
            job_name=environ["TFCONFIG_JOB_NAME"],
            service=environ["TFCONFIG_SERVICE"],
            workers=int(environ["TFCONFIG_WORKERS"]),
            index=int(environ["JOB_COMPLETION_INDEX"]),
            port=int(environ.get("TFCONFIG_PORT", "2222")),
        )
    except KeyError as error:
        raise ValueError(f"{error.args[0]} is required") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m job.cluster.tfconfig COMMAND [ARGS...]", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        tf_config = tf_config_from_env(os.environ)
    except ValueError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ["TF_CONFIG"] = tf_config
    print(f"TF_CONFIG={tf_config}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)
    return EXIT_FAILED  # not reached


if __name__ == "__main__":
    sys.exit(main())
