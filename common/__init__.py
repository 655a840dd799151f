"""Common: the TensorFlow-free pieces the job and the export share (progress lines, quiet start, the run record, the run's files, CACHE_DIR's default)."""
