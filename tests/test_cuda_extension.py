"""The CUDA extension batikfast._C as a build artefact: how it builds, loads and refuses input.

Runs without a GPU: the extension imports and registers its ops on a CPU-only machine. Where
it was not built, the tests that need it skip with the loader's own reason. The kernels'
numerics are in tests/test_cuda_ops.py (GPU only).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batikfast import _cuda

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"

# The schemas of the internal contract; a change here is a change of the kernel-level API.
SCHEMAS = {
    "bias_act_forward": "batikfast_cuda::bias_act_forward(Tensor x, Tensor? b, int dim, str act, "
                        "float alpha, float gain, float clamp) -> Tensor",
    "bias_act_backward": "batikfast_cuda::bias_act_backward(Tensor dy, Tensor x, Tensor? b, "
                         "int dim, str act, float alpha, float gain, float clamp, int order) "
                         "-> Tensor",
    "upfirdn2d": "batikfast_cuda::upfirdn2d(Tensor x, Tensor f, int upx, int upy, int downx, "
                 "int downy, int padx0, int padx1, int pady0, int pady1, bool flip_filter, "
                 "float gain) -> Tensor",
    "modulated_conv2d_forward": "batikfast_cuda::modulated_conv2d_forward(Tensor x, "
                                "Tensor weight, Tensor in_scale, Tensor? out_scale, "
                                "Tensor? noise, Tensor? bias, str act, float alpha, float gain, "
                                "float clamp, int padding) -> Tensor",
    "diffusion_noise_forward": "batikfast_cuda::diffusion_noise_forward(Tensor x, "
                               "Tensor x_scale, Tensor? noise_scale, Tensor? noise, int seed, "
                               "int offset) -> Tensor",
}


def _kernel_ops():
    # modulated_conv2d is in the build only once its source exists.
    return [name for name in SCHEMAS
            if name != "modulated_conv2d_forward" or (CSRC / "modulated_conv2d.cu").exists()]


@pytest.fixture(scope="module")
def extension():
    ok, reason = _cuda.available()
    if not ok:
        pytest.skip(f"batikfast._C is not available: {reason}")
    return _cuda.load()


def _cpu(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def test_import_batikfast_does_not_load_the_cuda_extension():
    code = ("import sys, batikfast, batikfast.backends; "
            "loaded = [m for m in ('batikfast._C', 'batikfast._cuda') if m in sys.modules]; "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_extension_build_info_matches_the_running_torch(extension):
    info = _cuda.build_info()
    assert set(info) == {"torch_version", "cuda_version", "arch_list"}
    assert info["torch_version"].split("+")[0].split(".")[:2] == \
        torch.__version__.split("+")[0].split(".")[:2]
    assert info["cuda_version"] == str(torch.version.cuda)
    assert info["arch_list"], "the build must record the GPU architectures it targets"


@pytest.mark.parametrize("name", _kernel_ops())
def test_extension_registers_each_kernel_with_the_contract_schema(extension, name):
    op = getattr(torch.ops.batikfast_cuda, name)
    assert str(op.default._schema) == SCHEMAS[name]


def test_loader_refuses_a_build_for_another_torch_with_an_actionable_message():
    class StaleBuild:
        @staticmethod
        def build_info():
            return {"torch_version": "1.13.1+cu117", "cuda_version": "11.7", "arch_list": "8.0"}

    reason = _cuda._check_build(StaleBuild)
    assert reason is not None
    assert "built for torch 1.13.1+cu117" in reason and torch.__version__ in reason
    assert "pip install --no-build-isolation -e ." in reason


def test_loader_accepts_a_build_for_the_same_torch_minor_version():
    class SameBuild:
        @staticmethod
        def build_info():
            return {"torch_version": torch.__version__.split("+")[0] + "+other",
                    "cuda_version": "x", "arch_list": "9.0"}

    assert _cuda._check_build(SameBuild) is None


def test_available_gives_a_reason_exactly_when_the_extension_cannot_load():
    ok, reason = _cuda.available()
    assert (reason is None) == ok
    if not ok:
        assert "pip install" in reason or "BATIKFAST_JIT" in reason


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as if nothing had been imported yet (restored afterwards)."""
    monkeypatch.setattr(_cuda, "_tried", False)
    monkeypatch.setattr(_cuda, "_module", None)
    monkeypatch.setattr(_cuda, "_reason", None)
    for var in ("BATIKFAST_JIT", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_cuda, "_import_built", lambda: (None, "not built (test)"))
    return monkeypatch


def test_loader_never_compiles_unless_batikfast_jit_is_set(fresh_loader):
    from torch.utils import cpp_extension

    fresh_loader.setattr(cpp_extension, "load", lambda **kw: pytest.fail("compiled implicitly"))
    assert _cuda.available() == (False, "not built (test)")


def test_loader_compiles_the_csrc_sources_when_batikfast_jit_is_set(fresh_loader):
    from torch.utils import cpp_extension

    class Built:
        @staticmethod
        def build_info():
            return {"torch_version": torch.__version__, "cuda_version": "x", "arch_list": "9.0"}

    calls = []
    fresh_loader.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or Built)
    fresh_loader.setenv("BATIKFAST_JIT", "1")
    fresh_loader.syspath_prepend(str(CSRC))
    import extension as config

    if config.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert _cuda.load() is Built
    (kwargs,) = calls
    names = {Path(s).name for s in kwargs["sources"]}
    assert {"bindings.cpp", "bias_act.cu", "upfirdn2d.cu", "diffusion_noise.cu"} <= names
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    assert any(flag.startswith("-DBATIKFAST_TORCH_VERSION=") for flag in kwargs["extra_cflags"])


@pytest.mark.parametrize("call", [
    lambda: _cuda.bias_act_forward(_cpu(2, 3), None, 1, "lrelu", 0.2, 1.4, None),
    lambda: _cuda.bias_act_backward(_cpu(2, 3), _cpu(2, 3), None, 1, "lrelu", 0.2, 1.4, None, 1),
    lambda: _cuda.upfirdn2d(_cpu(1, 1, 4, 4), _cpu(1, 4), 2, 1, 1, 1, 2, 1, 0, 0, False, 1.0),
    lambda: _cuda.modulated_conv2d_forward(_cpu(1, 2, 4, 4), _cpu(3, 2, 3, 3), _cpu(1, 2), None,
                                           None, None, "linear", 0.0, 1.0, None, 1),
    lambda: _cuda.diffusion_noise_forward(_cpu(2, 3), _cpu(2), _cpu(2), None, 0, 0),
], ids=["bias_act_forward", "bias_act_backward", "upfirdn2d", "modulated_conv2d_forward",
        "diffusion_noise_forward"])
def test_python_entry_points_reject_cpu_tensors_naming_the_argument(call):
    with pytest.raises(ValueError, match=r"x must be a CUDA tensor.*cpu"):
        call()


def test_registered_ops_refuse_cpu_tensors(extension):
    with pytest.raises((NotImplementedError, RuntimeError), match="CPU"):
        torch.ops.batikfast_cuda.bias_act_forward(_cpu(2, 3), None, 1, "relu", 0.0, 1.0, -1.0)


# ---- build configuration (csrc/extension.py) -------------------------------------------------

# Read before any fixture clears the variable for the build-configuration tests.
BUILD_SWITCHED_OFF = os.environ.get("BATIKFAST_BUILD_CUDA") == "0"

@pytest.fixture
def extension_config(monkeypatch):
    monkeypatch.syspath_prepend(str(CSRC))
    for var in ("BATIKFAST_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    import extension as config

    return config


def test_build_is_skipped_with_one_message_when_disabled(extension_config, monkeypatch, capsys):
    monkeypatch.setenv("BATIKFAST_BUILD_CUDA", "0")
    assert extension_config.cuda_extensions() == []
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "BATIKFAST_BUILD_CUDA=0" in message[0]


def test_build_targets_sm80_and_sm90_by_default_without_probing_a_gpu(extension_config):
    if extension_config.find_cuda_home() is None or not torch.version.cuda:
        pytest.skip("no CUDA toolkit or a CPU-only torch: the extension would be skipped")
    extensions = extension_config.cuda_extensions()
    assert [e.name for e in extensions] == ["batikfast._C"]
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    sources = {Path(s).name for s in extensions[0].sources}
    assert {"bindings.cpp", "bias_act.cu", "upfirdn2d.cu", "diffusion_noise.cu"} <= sources
    from torch.utils import cpp_extension

    flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags


def test_cuda_home_is_a_toolkit_with_nvcc_and_headers(extension_config):
    home = extension_config.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert (Path(home) / "bin" / "nvcc").is_file()
    assert (Path(home) / "include" / "cuda_runtime.h").is_file()


def test_extension_was_built_wherever_a_toolkit_and_a_cuda_torch_exist(extension_config):
    """CI has nvcc and no GPU: a compile error there must fail the tests, not pass silently."""
    if BUILD_SWITCHED_OFF:
        pytest.skip("BATIKFAST_BUILD_CUDA=0: the build was switched off")
    if extension_config.find_cuda_home() is None or not torch.version.cuda:
        pytest.skip("no CUDA toolkit or a CPU-only torch: nothing to build")
    ok, reason = _cuda.available()
    assert ok, f"a CUDA toolkit is here but batikfast._C did not build or load: {reason}"


def test_modulated_conv2d_cpp_checks_name_each_bad_argument_without_a_gpu(monkeypatch):
    """The raw op's own argument checks (past the Python wrapper), run on fake CUDA tensors:
    dispatching straight to the op's CUDA kernel function runs its C++ validation, which reads
    only metadata, so every bad call must raise its named error here too. The same cases run
    on real tensors, in a child process, on a GPU (test_cuda_modulated_conv2d.py)."""
    import functools
    import re

    from torch._subclasses.fake_tensor import FakeTensorMode

    from tests import test_cuda_modulated_conv2d as modconv_tests

    available, reason = _cuda.available()
    if not available:
        pytest.skip(f"batikfast._C is not available: {reason}")
    op = torch.ops.batikfast_cuda.modulated_conv2d_forward.default
    cuda_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    monkeypatch.setattr(modconv_tests, "raw_op",
                        lambda: functools.partial(op.redispatch, cuda_kernel))
    with FakeTensorMode(allow_non_fake_inputs=True):
        for case, call, message in modconv_tests.BAD_CALLS:
            with pytest.raises(RuntimeError, match=re.escape(message)):
                call()


def _raw_bad_calls(gpu):
    """(op, arguments, words the error must contain) for the raw ops other than the modulated
    convolution (which has its own table in test_cuda_modulated_conv2d.py)."""
    x, b, f = torch.randn(2, 3, 5, 5, device=gpu), torch.randn(3, device=gpu), torch.ones(4, 4, device=gpu)
    ones = torch.ones(2, device=gpu)
    act = ("lrelu", 0.2, 1.0, -1.0)
    up = (False, 1.0)
    return [
        ("bias_act_forward", (x.cpu(), b, 1, *act), "x must be a CUDA tensor"),
        ("bias_act_forward", (x.double(), b, 1, *act), "x must be float32, float16 or bfloat16"),
        ("bias_act_forward", (x, torch.randn(4, device=gpu), 1, *act), "b must be 1-D"),
        ("bias_act_forward", (x, b.cpu(), 1, *act), "b must be a CUDA tensor"),
        ("bias_act_forward", (x, b, 4, *act), "dim must be an axis of x"),
        ("bias_act_forward", (x, b, 1, "gelu", 0.2, 1.0, -1.0), "act must be one of"),
        ("bias_act_backward", (x, x, b, 1, *act, 3), "order must be 1 or 2"),
        ("bias_act_backward", (x[:, :2], x, b, 1, *act, 1), "dy must have the shape of x"),
        ("bias_act_backward", (x.half(), x, b, 1, *act, 1), "dy must have x's dtype"),
        ("upfirdn2d", (x.cpu(), f, 1, 1, 1, 1, 0, 0, 0, 0, *up), "x must be a CUDA tensor"),
        ("upfirdn2d", (x[0], f, 1, 1, 1, 1, 0, 0, 0, 0, *up), "x must be 4-D"),
        ("upfirdn2d", (x, f.cpu(), 1, 1, 1, 1, 0, 0, 0, 0, *up), "f must be a CUDA tensor"),
        ("upfirdn2d", (x, f[0], 1, 1, 1, 1, 0, 0, 0, 0, *up), "f must be a non-empty 2-D filter"),
        ("upfirdn2d", (x, f, 0, 1, 1, 1, 0, 0, 0, 0, *up), "upx and upy must be >= 1"),
        ("upfirdn2d", (x, f, 1, 1, 1, 0, 0, 0, 0, 0, *up), "downx and downy must be >= 1"),
        ("upfirdn2d", (x, f, 1, 1, 1, 1, -3, -3, 0, 0, *up), "the output would be empty"),
        ("diffusion_noise_forward", (x, torch.ones(3, device=gpu), None, None, 1, 0),
         "x_scale must have shape [2]"),
        ("diffusion_noise_forward", (x, torch.ones(2), None, None, 1, 0),
         "x_scale must be a CUDA tensor"),
        ("diffusion_noise_forward", (x, ones, ones, torch.ones(2, 3, 5, 4, device=gpu), 1, 0),
         "noise must have x's shape"),
        ("diffusion_noise_forward", (x, ones, None, None, -1, 0), "seed must be >= 0"),
        ("diffusion_noise_forward", (x, ones, None, None, 1, -5), "offset must be >= 0"),
    ]


def test_raw_op_cpp_checks_name_each_bad_argument_without_a_gpu():
    """As above, for bias_act (both directions), upfirdn2d and diffusion noise: each bad call
    reaches the op's CUDA kernel function on fake CUDA tensors and must raise its named error."""
    import re

    from torch._subclasses.fake_tensor import FakeTensorMode

    available, reason = _cuda.available()
    if not available:
        pytest.skip(f"batikfast._C is not available: {reason}")
    cuda_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with FakeTensorMode(allow_non_fake_inputs=True):
        cases = _raw_bad_calls(torch.device("cuda"))
        for name, args, words in cases:
            op = getattr(torch.ops.batikfast_cuda, name).default
            with pytest.raises(RuntimeError, match=re.escape(words)):
                op.redispatch(cuda_kernel, *args)
