"""Benchmarks for cl_tokens: hot path, peers, stampedes and scale (not part of the test run).

Run ``python -m benchmarks`` (or ``--quick``) from the repository root; see README.md here.
"""
