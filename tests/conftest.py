"""Test setup: without a GPU, Triton kernels run in the interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top
of the first module pytest loads.
"""
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from batikfast import backends  # noqa: E402

# An install maps kernels/ to batikfast.kernels; a plain checkout on PYTHONPATH or a legacy
# editable install does not, so register the checkout's kernels/ under that name for the tests.
if importlib.util.find_spec("batikfast.kernels") is None:
    backends.register_checkout_kernels()


def pytest_report_header(config):
    where = torch.cuda.get_device_name() if HAS_GPU else "CPU only (Triton interpreted)"
    return f"batikfast tests on: {where}; torch {torch.__version__}"


@pytest.fixture
def one_thread():
    """torch on one thread: the CI machine's 2 shared cores only spin against each other with
    more (training-sized tests use it through ``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")
