"""Performance benchmarks of STIP serving: `python -m bench.run`."""
