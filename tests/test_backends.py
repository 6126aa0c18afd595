"""One place chooses the implementation: impl=, then set_backend, then BATIKFAST_BACKEND, then auto."""
import subprocess
import sys
import warnings

import pytest
import torch

import batikfast
from batikfast import backends, ops


@pytest.fixture(autouse=True)
def clean_backend_state(monkeypatch):
    monkeypatch.delenv("BATIKFAST_BACKEND", raising=False)
    batikfast.set_backend(None)
    yield
    batikfast.set_backend(None)


def test_auto_picks_the_reference_for_cpu_tensors():
    assert backends.resolve("bias_act", torch.zeros(2)) == "ref"


def test_impl_argument_beats_set_backend_which_beats_the_environment(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("BATIKFAST_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailableError):
        backends.resolve("bias_act", x)
    assert backends.resolve("bias_act", x, impl="ref") == "ref"  # impl beats the environment
    batikfast.set_backend("ref")
    assert backends.resolve("bias_act", x) == "ref"  # set_backend beats the environment
    # impl beats set_backend: with both saying "ref" that could not be seen, so set_backend
    # names an implementation these CPU tensors cannot use.
    batikfast.set_backend("cuda")
    assert backends.resolve("bias_act", x, impl="ref") == "ref"
    batikfast.set_backend(None)
    monkeypatch.setenv("BATIKFAST_BACKEND", "auto")
    assert backends.resolve("bias_act", x) == "ref"


def test_unknown_backend_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="must be one of"):
        batikfast.set_backend("fast")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.bias_act(torch.zeros(2), impl="cudnn")


def test_asking_for_cuda_on_cpu_tensors_says_why_and_what_to_do():
    with pytest.raises(backends.BackendUnavailableError, match="needs CUDA tensors.*impl='ref'"):
        ops.bias_act(torch.zeros(2, 3), impl="cuda")


def test_asking_for_triton_on_cpu_without_the_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.upfirdn2d(torch.zeros(1, 1, 4, 4), None, impl="triton")


def test_fast_backends_refuse_float64_with_the_supported_dtypes_named():
    reason = backends.unavailable_reason("triton", torch.device("cpu"), torch.float64)
    assert reason is not None and "float32, float16 and bfloat16" in reason


def test_auto_fallback_warns_once_per_reason(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda impl, d, t: None if impl == "ref" else "nope")
    monkeypatch.setattr(backends, "_warned_reasons", set())
    fake_gpu = torch.empty(0, device="meta")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.resolve("bias_act", fake_gpu) == "ref"
    assert len([w for w in caught if "fall back" in str(w.message)]) == 1


def test_report_lists_every_implementation_with_its_status():
    text = backends.report()
    for impl in backends.IMPLEMENTATIONS:
        assert f"  {impl}" in text
    assert "ref" in text and ("available" in text)


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_report_says_whether_fp32_convolutions_may_use_tf32(monkeypatch, allow_tf32):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    assert ("TF32 allowed" if allow_tf32 else "full fp32") in backends.report()


def test_report_names_an_invalid_backend_variable_instead_of_failing(monkeypatch):
    # `python -m batikfast.info` is what a confused user runs: a typo in BATIKFAST_BACKEND must
    # show up in its report, not as a traceback in place of it.
    monkeypatch.setenv("BATIKFAST_BACKEND", "tritn")
    text = backends.report()
    assert "forced backend: invalid" in text and "BATIKFAST_BACKEND" in text and "'tritn'" in text
    for impl in backends.IMPLEMENTATIONS:
        assert f"  {impl}" in text


def test_python_m_batikfast_info_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "batikfast.info"], capture_output=True, text=True,
                         check=True).stdout
    assert "batikfast backends" in out and "cuda" in out


def test_importing_batikfast_loads_neither_triton_nor_the_extension_nor_cuda():
    code = ("import sys, batikfast, batikfast.ops, batikfast.backends; "
            "import torch; "
            "print(int('triton' in sys.modules), int('batikfast._C' in sys.modules), "
            "int(torch.cuda.is_initialized()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "0"], out.stdout + out.stderr


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_availability_checks_trace_under_fullgraph_compile(impl):
    """Dispatch runs inside compiled networks: asking whether an implementation can run a GPU
    call must not break the graph (the extension loader's lock once did, on every GPU)."""
    torch._dynamo.reset()
    gpu = torch.device("cuda")

    @torch.compile(fullgraph=True, backend="eager")
    def offset_by_availability(x):
        reason = backends.unavailable_reason(impl, gpu, torch.float16)
        return x + (1.0 if reason is None else 2.0)

    expected = 1.0 if backends.unavailable_reason(impl, gpu, torch.float16) is None else 2.0
    assert offset_by_availability(torch.zeros(2)).tolist() == [expected, expected]


def test_constant_under_compile_marks_functions_as_torch_compiler_does():
    """batikfast marks without importing dynamo (lean import); the mark must stay the one
    torch.compiler.assume_constant_result sets, or compiled dispatch breaks the graph again."""
    def probe():
        return None

    def ours():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    added = {name for name in vars(marked)}
    backends.constant_under_compile(ours)
    assert added and all(getattr(ours, name) == getattr(marked, name) for name in added)


def test_the_fallback_warning_is_given_once_from_compiled_code_too(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(backends, "_warned_reasons", set())
    reasons = ("cuda: not built here", "triton: not installed here")

    @torch.compile(fullgraph=True, backend="eager")
    def warn_then_add(x):
        backends._warn_once("bias_act", "ref", reasons)
        return x + 1

    with pytest.warns(RuntimeWarning, match="fall back to the 'ref' implementation"):
        assert warn_then_add(torch.zeros(2)).tolist() == [1.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends._warn_once("bias_act", "ref", reasons)  # once per reason, compiled or not
