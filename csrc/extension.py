"""Build configuration of the CUDA extension ``batikfast._C`` (imported by setup.py).

``cuda_extensions()`` returns the ``CUDAExtension`` list, or ``[]`` after printing one line that
says why the extension is skipped: ``BATIKFAST_BUILD_CUDA=0``, a CPU-only torch, or no CUDA
toolkit. A plain install therefore never fails because of CUDA.

Environment:
    BATIKFAST_BUILD_CUDA   0 skips the extension; 1 requires it (a missing toolkit or a compile
                           error fails the install); unset builds it when possible.
    CUDA_HOME / CUDA_PATH  the toolkit; by default the one behind ``nvcc`` on PATH.
    TORCH_CUDA_ARCH_LIST   target architectures; default "8.0;9.0+PTX" (A100, H100, and PTX
                           that newer GPUs JIT-compile). Always set explicitly before the build,
                           so no GPU is needed (torch would otherwise probe the visible GPUs).
    MAX_JOBS               parallel compile jobs (honoured by torch's ninja build).
    BATIKFAST_NVCC_FLAGS   extra nvcc flags, appended (e.g. "-Xptxas -v").
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
HERE = os.path.dirname(os.path.abspath(__file__))


def _say(message: str) -> None:
    print(f"batikfast: {message}", file=sys.stderr, flush=True)


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else the toolkit behind ``nvcc`` on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _is_toolkit(os.environ[var]) else None
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # nvcc on PATH may be a wrapper script, not a symlink: nvcc itself reports its home.
        try:
            dry = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            match = re.search(r"^#\$ _HERE_=(.+)$", dry.stderr + dry.stdout, re.MULTILINE)
            if match:
                candidates.append(os.path.dirname(match.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if _is_toolkit(c)), None)


def _extra_include_dirs(cuda_home: str) -> list[str]:
    # Some toolkits ship without the math-library headers that torch's CUDA headers include
    # (cusparse.h, cublas_v2.h); the pip wheels torch depends on (nvidia-*) carry them.
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    dirs = []
    for path in sys.path:
        for include in sorted(glob.glob(os.path.join(path, "nvidia", "*", "include"))):
            if os.path.isfile(os.path.join(include, "cusparse.h")) and include not in dirs:
                dirs.append(include)
    return dirs[:1]


def _version_token(text: str) -> str:
    # Passed through a shell by ninja and stringified by the preprocessor: keep it to
    # characters that need no quoting (anything else, ';' included, becomes '_').
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def cuda_extensions() -> list:
    """The ``CUDAExtension`` for ``batikfast._C``, or ``[]`` with one message saying why not."""
    wanted = os.environ.get("BATIKFAST_BUILD_CUDA", "").strip()
    if wanted == "0":
        _say("BATIKFAST_BUILD_CUDA=0: skipping the CUDA extension batikfast._C "
             "(the Triton and reference implementations still work)")
        return []
    required = wanted == "1"

    def skip(reason: str) -> list:
        if required:
            raise RuntimeError(f"BATIKFAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension batikfast._C: {reason} "
             "(the Triton and reference implementations still work)")
        return []

    try:
        import torch
    except ImportError:
        return skip("torch is not importable; install torch first and use "
                    "pip install --no-build-isolation")
    if not torch.version.cuda:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (put nvcc on PATH or set CUDA_HOME)")
    sources = sorted(glob.glob(os.path.join(HERE, "*.cu"))) + [os.path.join(HERE, "bindings.cpp")]
    if not os.path.isfile(sources[-1]):
        return skip(f"{sources[-1]} is missing")

    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
    os.environ["CUDA_HOME"] = cuda_home
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before CUDA_HOME was set
    _say(f"building the CUDA extension batikfast._C with {cuda_home} for "
         f"TORCH_CUDA_ARCH_LIST={arch_list!r} (MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")

    defines = [
        f"-DBATIKFAST_TORCH_VERSION={_version_token(torch.__version__)}",
        f"-DBATIKFAST_CUDA_VERSION={_version_token(str(torch.version.cuda))}",
        # ';' becomes '_' here and back in bindings.cpp.
        f"-DBATIKFAST_ARCH_LIST={_version_token(arch_list)}",
    ]
    # Only bindings.cpp reads the defines (nvcc would split a value at commas anyway).
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    nvcc_flags += os.environ.get("BATIKFAST_NVCC_FLAGS", "").split()
    return [cpp_extension.CUDAExtension(
        name="batikfast._C",
        sources=[os.path.relpath(s, os.path.dirname(HERE)) for s in sources],
        include_dirs=[HERE] + _extra_include_dirs(cuda_home),
        extra_compile_args={"cxx": ["-O3"] + defines, "nvcc": nvcc_flags},
    )]


def build_ext_class():
    """torch's ninja-driven ``build_ext`` (respects MAX_JOBS).

    A compile failure is fatal only with ``BATIKFAST_BUILD_CUDA=1`` (what CI sets); otherwise the
    package installs without the extension after one message, as when no toolkit is found.
    """
    from torch.utils import cpp_extension

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def build_extensions(self):
            self._failed = []
            super().build_extensions()
            # setuptools copies (in place, editable) and lists every extension's library
            # afterwards: forget the ones that did not build.
            if self._failed:
                self.extensions = [e for e in self.extensions if e not in self._failed]
                self.distribution.ext_modules = [
                    e for e in self.distribution.ext_modules or [] if e not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler or ninja failure
                if os.environ.get("BATIKFAST_BUILD_CUDA", "").strip() == "1":
                    raise
                self._failed.append(ext)
                _say(f"compiling the CUDA extension {ext.name} failed ({error}); installing "
                     "without it (the Triton and reference implementations still work). "
                     "Set BATIKFAST_BUILD_CUDA=1 to make this an error and see why.")

    return BuildExtension
