"""Reproducible performance scripts (``python -m benchmarks.run_all [--smoke]``); see common.py for their shape."""
