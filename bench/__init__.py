"""Benchmarks: wsserver against a plain-Tornado baseline, in one run.

``python -m bench`` runs every scenario (see :mod:`bench.runner`), writes
``bench/results/latest.json`` and prints a table; ``--smoke`` is the
few-second version CI runs. docs/performance.md explains the figures.
"""
