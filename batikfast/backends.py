"""The one place that decides which implementation of an op runs.

Three implementations exist for every op: ``"ref"`` (pure PyTorch, in ``batikfast/ops``),
``"triton"`` (``kernels/``, importable as ``batikfast.kernels``) and ``"cuda"`` (the extension
``batikfast._C`` built from ``csrc/``). The choice, in order of precedence:

1. the op's ``impl=`` argument;
2. :func:`set_backend`;
3. the environment variable ``BATIKFAST_BACKEND`` (``ref``, ``triton``, ``cuda`` or ``auto``);
4. auto: CUDA extension when it is built and the tensors are on a GPU, else Triton on a GPU,
   else the reference.

An implementation asked for by name that cannot run raises :class:`BackendUnavailableError`
saying why and what to do. Auto falls back with one warning per reason, never silently per call.
Importing this module touches neither CUDA nor Triton nor the extension.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

IMPLEMENTATIONS = ("ref", "triton", "cuda")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_backend_override: str | None = None
_warned_reasons: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """An implementation was asked for by name but cannot run this call."""


def set_backend(name: str | None) -> None:
    """Choose the implementation for every op that is not given ``impl=``.

    ``None`` or ``"auto"`` restores automatic choice (``BATIKFAST_BACKEND`` still applies).
    """
    global _backend_override
    _backend_override = None if name in (None, "auto") else _checked_name(name, "backend")


def get_backend() -> str | None:
    """The implementation forced by :func:`set_backend` or ``BATIKFAST_BACKEND``; None for auto."""
    if _backend_override is not None:
        return _backend_override
    env = os.environ.get("BATIKFAST_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    return _checked_name(env, "BATIKFAST_BACKEND")


def _checked_name(name: str, what: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{what} must be one of {IMPLEMENTATIONS} or 'auto', got {name!r}")
    return name


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


_NOT_LOOKED_UP = object()
_triton_missing = _NOT_LOOKED_UP


def _triton_import_error() -> str | None:
    # Cached in a module global rather than by functools.lru_cache: torch.compile traces this
    # (dispatch runs inside compiled code) and warns that it ignores an lru_cache wrapper.
    global _triton_missing
    if _triton_missing is _NOT_LOOKED_UP:
        _triton_missing = (None if importlib.util.find_spec("triton") is not None
                           else "Triton is not installed (pip install triton)")
    return _triton_missing


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run on ``device`` / ``dtype``; None when they can."""
    missing = _triton_import_error()
    if missing:
        return missing
    if dtype not in FAST_DTYPES:
        return f"the Triton kernels support float32, float16 and bfloat16, not {dtype}"
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "batikfast's Triton kernels are tested on NVIDIA GPUs only"
        return None
    if device.type == "cpu":
        if interpreting_triton():
            return None
        return ("Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 before importing "
                "triton to interpret them on the CPU (slow, for tests)")
    return f"the Triton kernels do not run on device type {device.type!r}"


def cuda_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the CUDA extension cannot run on ``device`` / ``dtype``; None when it can."""
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors, got tensors on {device}"
    if dtype not in FAST_DTYPES:
        return f"the CUDA kernels support float32, float16 and bfloat16, not {dtype}"
    from batikfast import _cuda  # lazy: loading the extension is never done at import

    ok, why = _cuda.available()
    return None if ok else why


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if impl == "ref":
        return None
    if impl == "triton":
        return triton_unavailable_reason(device, dtype)
    return cuda_unavailable_reason(device, dtype)


def resolve(op: str, x: torch.Tensor, impl: str | None = None) -> str:
    """Pick the implementation of ``op`` for a call whose main input is ``x``."""
    requested = _checked_name(impl, "impl") if impl is not None else get_backend()
    device, dtype = x.device, x.dtype
    if requested is not None:
        reason = unavailable_reason(requested, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: implementation {requested!r} cannot run this call: {reason}. "
                f"Use impl='ref' or leave impl unset for automatic choice; "
                f"`python -m batikfast.info` lists what is available.")
        return requested
    if device.type != "cuda":
        return "ref"
    reasons = []
    for candidate in ("cuda", "triton"):
        reason = unavailable_reason(candidate, device, dtype)
        if reason is None:
            if reasons:
                _warn_once(op, candidate, tuple(reasons))
            return candidate
        reasons.append(f"{candidate}: {reason}")
    _warn_once(op, "ref", tuple(reasons))
    return "ref"


def constant_under_compile(fn):
    """Mark ``fn`` as torch.compiler.assume_constant_result does: dynamo then calls it once
    while tracing and keeps its answer, instead of tracing into it. For checks whose answer
    never changes once given (and whose bodies dynamo cannot trace: locks, warnings). Set
    directly, because assume_constant_result imports dynamo, and with it triton, whenever
    batikfast is imported; a test pins the attribute to the one torch sets."""
    fn._dynamo_marked_constant = True
    return fn


# A constant under compile: dynamo cannot trace warnings.warn (a graph break, an error under
# fullgraph), and called once at trace time it warns exactly when it should.
@constant_under_compile
def _warn_once(op: str, chosen: str, reasons: tuple[str, ...]) -> None:
    key = f"{chosen}|{'|'.join(reasons)}"
    if key in _warned_reasons:
        return
    _warned_reasons.add(key)
    warnings.warn(
        f"batikfast: {op} and other ops fall back to the {chosen!r} implementation "
        f"({'; '.join(reasons)}). `python -m batikfast.info` explains.",
        RuntimeWarning, stacklevel=3)


def triton_kernels(op: str):
    """The module ``batikfast.kernels.<op>``, also when running from a source checkout."""
    try:
        return importlib.import_module(f"batikfast.kernels.{op}")
    except ModuleNotFoundError as error:
        if not error.name or not error.name.startswith("batikfast.kernels"):
            raise
    register_checkout_kernels()
    return importlib.import_module(f"batikfast.kernels.{op}")


def register_checkout_kernels() -> None:
    # setup.py maps kernels/ to batikfast.kernels; with PYTHONPATH=<checkout> nothing does.
    package_dir = Path(__file__).resolve().parent.parent / "kernels"
    init = package_dir / "__init__.py"
    if not init.exists():
        raise BackendUnavailableError(
            f"the Triton kernels are not installed and {package_dir} does not exist; "
            "reinstall batikfast (pip install --no-build-isolation -e .)")
    spec = importlib.util.spec_from_file_location(
        "batikfast.kernels", init, submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["batikfast.kernels"] = module
    spec.loader.exec_module(module)


def kernels(op: str, impl: str):
    """The object whose functions implement ``op`` for ``impl`` (the kernel-level API)."""
    if impl == "triton":
        return triton_kernels(op)
    if impl == "cuda":
        from batikfast import _cuda

        return _cuda
    raise ValueError(f"{op}: implementation {impl!r} has no kernels")


def report() -> str:
    """A table of the implementations, whether they can run here, and why not."""
    lines = [f"batikfast backends (torch {torch.__version__}, CUDA runtime {torch.version.cuda})"]
    gpu = torch.cuda.is_available()
    lines.append(f"  GPU: {torch.cuda.get_device_name() if gpu else 'none visible'}")
    lines.append(f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    lines.append("  fp32 convolutions: " + (
        "TF32 allowed (torch.backends.cudnn.allow_tf32; the fast kernels follow it)"
        if torch.backends.cudnn.allow_tf32 else
        "full fp32 (torch.backends.cudnn.allow_tf32 is off; the fast kernels follow it)"))
    try:
        forced = get_backend() or "auto"
    except ValueError as error:  # a bad BATIKFAST_BACKEND: report it, as the ops would raise it
        forced = f"invalid ({error}); ops called without impl= or set_backend() raise this"
    lines.append(f"  forced backend: {forced}")
    device = torch.device("cuda" if gpu else "cpu")
    for impl in IMPLEMENTATIONS:
        reason = unavailable_reason(impl, device, torch.float32)
        status = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {impl:<7} on {device.type}: {status}")
    if not gpu:
        lines.append("  auto on this machine: 'ref' (no GPU)")
    return "\n".join(lines)
