"""Results: scoring, the run report, the one writer that publishes a run, and the run's identity."""
