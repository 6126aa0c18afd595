"""Benchmarks for batikfast: ops, whole networks, the training step, NVIDIA's code beside
ours (``benchmarks/README.md``; ``python benchmarks/run.py --help``).

A package so that the scripts and the pytest-benchmark entries share one set of shapes, one
timer, one way of counting bytes and FLOPs and one way of writing results (``common.py``,
``textfmt.py``).
"""
