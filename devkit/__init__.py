"""Devkit: helpers the tests and the benchmarks share: slices of the real data sets, the GCS emulator."""
