"""Sub-benchmarks of tools/benchmark.py: each returns ratios of two things timed side by side."""
