"""Hand-run measurements behind docs/benchmarks.md; each prints JSON.

Run each from the repository root as a module, `python -m bench.<script>` (tests/test_bench.py runs
each on tiny data, most through their `main(argv)`); they import the project's packages and devkit/ as installed by
`make setup`, with no path edits of their own.
"""
