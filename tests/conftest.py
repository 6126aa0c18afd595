"""Test setup: without a GPU, Triton kernels run in the interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top
of the first module pytest loads.
"""
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402

from batikfast import backends  # noqa: E402

# An install maps kernels/ to batikfast.kernels; a plain checkout on PYTHONPATH or a legacy
# editable install does not, so register the checkout's kernels/ under that name for the tests.
if importlib.util.find_spec("batikfast.kernels") is None:
    backends.register_checkout_kernels()


def _interpret_device_function_calls_without_repatching():
    """Triton's interpreter re-patches triton.language (inspect.getmembers over its modules)
    at every call of a @triton.jit function from a kernel, tl.zeros and the other standard
    library functions included: a third of the interpreted convolution's time went there. The
    patches of a helper's call stay in place for the rest of the launch, so here a helper whose
    language modules this launch has patched already runs its rewritten body directly, as the
    interpreter does after patching; the first call per module still patches."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        launch_class, helper_class = interpreter.GridExecutor, interpreter.InterpretedFunction
        error_class = interpreter.InterpreterError
    except (ImportError, AttributeError):  # no Triton, or one laid out differently
        return
    patched_per_launch: list[set[int]] = []  # ids of the modules each running launch patched
    run_launch, call_helper = launch_class.__call__, helper_class.__call__

    @functools.cache  # a function's module, hence its answer, never changes
    def language_modules(fn) -> frozenset[int]:  # the modules the interpreter patches for fn
        return frozenset(id(value) for value in fn.__globals__.values()
                         if value is tl or value is tl.core)

    def launch(self, *args, **kwargs):
        patched_per_launch.append(set(language_modules(self.fn)))
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            patched_per_launch.pop()

    def helper(self, *args, **kwargs):
        needed = language_modules(self.fn)
        if not patched_per_launch or not needed <= patched_per_launch[-1]:
            if patched_per_launch:
                patched_per_launch[-1] |= needed
            return call_helper(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as error:
            raise error_class(repr(error)) from error

    launch_class.__call__, helper_class.__call__ = launch, helper


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_device_function_calls_without_repatching()


# Under pytest-xdist (the README's -n auto) every worker imports this file: they share the
# controller's seed through the environment, so one BATIKFAST_TEST_SEED replays the whole run.
from tests._support import SESSION_SEED  # noqa: E402

os.environ["BATIKFAST_TEST_SEED"] = str(SESSION_SEED)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The workers split the cores: torch's threads in each would only contend with the others'.
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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


def pytest_addoption(parser):
    parser.addoption(
        "--shard", default=None, metavar="I/N",
        help="run only every N-th test from the I-th (0-based) in collection order: "
             "benchmarks/gpu_check.sh spreads a large test file over several processes so "
             "that the Triton kernels it compiles on a GPU compile on several cores")


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if spec is None:
        return
    index, count = _parse_shard(spec)
    kept = items[index::count]
    kept_ids = {id(item) for item in kept}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
    items[:] = kept


def _parse_shard(spec: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard takes I/N with 0 <= I < N, got {spec!r}")
    return index, count
