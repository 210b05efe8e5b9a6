"""Benchmarks: training-step time of every architecture x attention, and the SE blocks against
their memory-traffic floor. Command line: ``python bench/run.py`` (see bench/README.md)."""
