"""Benchmarks: scripts that print figures (`python -m benchmarks.load --help`)."""
