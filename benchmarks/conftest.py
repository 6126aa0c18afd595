"""pytest-benchmark entries live here (`pytest benchmarks/ --benchmark-only`).

The default `python -m pytest` collects only `tests/` (pytest.ini's testpaths). Importing
benchmarks.common first sets TRITON_INTERPRET=1 when there is no GPU, before triton loads.
"""
from benchmarks import common  # noqa: F401
