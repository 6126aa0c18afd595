"""Op and training-step benchmarks for batikfast (``python benchmarks/run.py --help``).

A package so that ``run.py``, ``train_step.py``, ``peer_nvidia.py`` and the pytest-benchmark
entries share one set of shapes, one timer and one way of counting bytes and FLOPs.
"""
