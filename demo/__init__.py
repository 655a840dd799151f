"""Demo: the job end to end on a small real data set, offline (`make demo`)."""
