"""Exit codes: what the job, the export, the predictor and their helper commands return.

Defined once, at the bottom layer every program imports (edge imports nothing of the others), so
an orchestrator reads one meaning per number: retry on 1, fix the input on 2, rerun to resume on 75.
"""
EXIT_OK = 0
EXIT_FAILED = 1  # a failure that a retry may fix (storage, a failed gate, nothing predicted)
EXIT_BAD_INPUT = 2  # bad configuration or input: retrying cannot help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run is checkpointed, run it again with the same RUN_ID
