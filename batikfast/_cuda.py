"""Loader and Python entry points of the CUDA extension ``batikfast._C``.

The extension is imported on first use, never by ``import batikfast``. Its kernels are the torch
ops ``torch.ops.batikfast_cuda.*`` (registered when the library loads); the functions here have
the kernel-level signatures of the internal contract (no autograd) and check their arguments
before calling, so a bad call fails with a message naming the argument rather than on the device.

A missing or stale build is reported by :func:`available` with what to do about it. Setting
``BATIKFAST_JIT=1`` lets :func:`load` compile the extension from ``csrc/`` with
``torch.utils.cpp_extension.load`` (minutes; cached in ``~/.cache/torch_extensions``) when no
built one is importable; it is never done implicitly.
"""
from __future__ import annotations

import glob
import importlib
import os
import threading
from typing import Optional

import torch

from batikfast.backends import constant_under_compile

REBUILD = "rebuild with: pip install --no-build-isolation -e ."
ACTIVATIONS = ("linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_module = None
_reason: Optional[str] = None
_tried = False


class CudaExtensionUnavailable(RuntimeError):
    """batikfast._C cannot be loaded; the message says why and what to do."""


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+")[0].split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2])


def _check_build(module) -> Optional[str]:
    info = module.build_info()
    built = str(info.get("torch_version", "unknown"))
    if built == "unknown" or _major_minor(built) != _major_minor(torch.__version__):
        return (f"batikfast._C was built for torch {built}, you have {torch.__version__}: "
                f"{REBUILD}")
    return None


def _import_built():
    try:
        return importlib.import_module("batikfast._C"), None
    except ModuleNotFoundError as error:
        if error.name not in ("batikfast._C", "batikfast"):
            raise
        return None, ("the CUDA extension batikfast._C is not built (no CUDA toolkit at install "
                      f"time, or BATIKFAST_BUILD_CUDA=0): install a CUDA toolkit and {REBUILD}; "
                      "or set BATIKFAST_JIT=1 to compile it on first use")
    except (ImportError, OSError) as error:
        return None, (f"batikfast._C failed to load ({error}); it was probably built against "
                      f"another torch or CUDA: {REBUILD}")


def _jit_build():
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    if not os.path.isfile(os.path.join(csrc, "extension.py")):
        return None, (f"BATIKFAST_JIT=1 but the CUDA sources are not here ({csrc}); "
                      "use a source checkout")
    import sys

    sys.path.insert(0, csrc)
    try:
        import extension  # csrc/extension.py: the same toolkit and flags as setup.py
    finally:
        sys.path.remove(csrc)
    cuda_home = extension.find_cuda_home()
    if cuda_home is None:
        return None, "BATIKFAST_JIT=1 but no CUDA toolkit was found (put nvcc on PATH or set CUDA_HOME)"
    os.environ.setdefault("CUDA_HOME", cuda_home)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or extension.DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    token = extension._version_token
    defines = [f"-DBATIKFAST_TORCH_VERSION={token(torch.__version__)}",
               f"-DBATIKFAST_CUDA_VERSION={token(str(torch.version.cuda))}",
               f"-DBATIKFAST_ARCH_LIST={token(arch_list)}"]
    sources = sorted(glob.glob(os.path.join(csrc, "*.cu"))) + [os.path.join(csrc, "bindings.cpp")]
    try:
        module = cpp_extension.load(
            name="batikfast_C_jit", sources=sources,
            extra_include_paths=[csrc] + extension._extra_include_dirs(os.environ["CUDA_HOME"]),
            extra_cflags=["-O3"] + defines,
            extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
            verbose=os.environ.get("BATIKFAST_JIT_VERBOSE") == "1")
    except Exception as error:  # noqa: BLE001 - any compiler failure becomes the reason
        return None, f"BATIKFAST_JIT=1 but compiling the CUDA extension failed: {error}"
    return module, None


def load():
    """The extension module; raises :class:`CudaExtensionUnavailable` saying why it cannot load."""
    global _module, _reason, _tried
    with _lock:
        if not _tried:
            _tried = True
            module, reason = _import_built()
            if module is None and os.environ.get("BATIKFAST_JIT") == "1":
                module, reason = _jit_build()
            if module is not None:
                reason = _check_build(module)
            _module, _reason = (module, None) if reason is None else (None, reason)
    if _module is None:
        raise CudaExtensionUnavailable(_reason)
    return _module


def available() -> tuple[bool, Optional[str]]:
    """(True, None) when the extension loads; else (False, why and what to do)."""
    try:
        load()
    except CudaExtensionUnavailable as error:
        return False, str(error)
    return True, None


# Dispatch asks this inside compiled code. Traced, load()'s lock is a context manager dynamo
# cannot enter (a graph break: an error under fullgraph); as a constant, dynamo calls it once
# and keeps the answer, which never changes once given.
available = constant_under_compile(available)


def build_info() -> dict:
    """What the loaded extension was compiled for: torch_version, cuda_version, arch_list."""
    return dict(load().build_info())


def _ops():
    load()
    return torch.ops.batikfast_cuda


# ---- argument checks: the ops would refuse too, but a Python error names the argument --------

def _check_tensor(name: str, t, device: Optional[torch.device] = None, dtypes=DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the CUDA kernels, got a tensor on "
                         f"{t.device}; use impl='ref' or 'triton' for CPU tensors")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the same device as x ({device}), got {t.device}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be one of {names}, got {t.dtype}")


def _check_optional(name: str, t, device: torch.device, dtypes=DTYPES) -> None:
    if t is not None:
        _check_tensor(name, t, device, dtypes)


def _check_per_sample(name: str, t, x: torch.Tensor) -> None:
    _check_tensor(name, t, x.device, (torch.float32,))
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape [{x.shape[0]}] (one value per sample of x), "
                         f"got {list(t.shape)}")


def _check_act(act: str, allowed=ACTIVATIONS) -> None:
    if act not in allowed:
        raise ValueError(f"act must be one of {', '.join(allowed)}, got {act!r}")


def _clamp_arg(clamp: Optional[float]) -> float:
    if clamp is None:
        return -1.0
    clamp = float(clamp)
    if clamp < 0 and clamp != -1.0:
        raise ValueError(f"clamp must be None or >= 0, got {clamp!r}")
    return clamp


def _check_bias(b, x: torch.Tensor, dim: int) -> None:
    if b is None:
        return
    _check_tensor("b", b, x.device)
    if b.ndim != 1 or b.shape[0] != x.shape[dim]:
        raise ValueError(f"b must be 1-D with x.shape[{dim}] = {x.shape[dim]} elements, "
                         f"got shape {list(b.shape)}")


def _check_dim(dim, x: torch.Tensor) -> int:
    if not isinstance(dim, int) or not -max(x.ndim, 1) <= dim < max(x.ndim, 1):
        raise ValueError(f"dim must be an axis of x (rank {x.ndim}), got {dim!r}")
    return dim % max(x.ndim, 1)


# ---- kernel-level API ------------------------------------------------------------------------

def bias_act_forward(x, b, dim, act, alpha, gain, clamp):
    """``clamp(act(x + b) * gain, -clamp, clamp)``, b broadcast along ``dim``; clamp None = off."""
    _check_tensor("x", x)
    dim = _check_dim(dim, x)
    _check_bias(b, x, dim)
    _check_act(act)
    return _ops().bias_act_forward(x, b, dim, act, float(alpha), float(gain), _clamp_arg(clamp))


def bias_act_backward(dy, x, b, dim, act, alpha, gain, clamp, order):
    """``dy * gain * act^(order)(x + b)`` where ``|act(x + b) * gain| <= clamp``, else 0."""
    _check_tensor("x", x)
    _check_tensor("dy", dy, x.device)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"dy must match x (shape {list(x.shape)}, {x.dtype}), "
                         f"got shape {list(dy.shape)}, {dy.dtype}")
    dim = _check_dim(dim, x)
    _check_bias(b, x, dim)
    _check_act(act)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    return _ops().bias_act_backward(dy, x, b, dim, act, float(alpha), float(gain),
                                    _clamp_arg(clamp), int(order))


def upfirdn2d(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
    """Upsample (zero insertion), pad (negative crops), FIR-filter with ``f``, downsample.

    NVIDIA's ``_upfirdn2d_ref`` semantics on NCHW ``x`` with a 2-D float32 filter ``f``:
    a true convolution unless ``flip_filter``; ``gain`` is a plain output scale.
    """
    _check_tensor("x", x)
    _check_tensor("f", f, x.device, (torch.float32,))
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {list(x.shape)}")
    if f.ndim != 2 or f.numel() == 0:
        raise ValueError(f"f must be a non-empty 2-D filter [fh, fw], got shape {list(f.shape)}")
    for name, value in (("upx", upx), ("upy", upy), ("downx", downx), ("downy", downy)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    fh, fw = f.shape
    out_h = (x.shape[2] * upy + pady0 + pady1 - fh + downy) // downy
    out_w = (x.shape[3] * upx + padx0 + padx1 - fw + downx) // downx
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d output would be empty ({out_h}x{out_w}): padding "
                         f"{[padx0, padx1, pady0, pady1]} too negative for input "
                         f"{list(x.shape[2:])} and filter {[fh, fw]}")
    return _ops().upfirdn2d(x, f, upx, upy, downx, downy, int(padx0), int(padx1), int(pady0),
                            int(pady1), bool(flip_filter), float(gain))


def modulated_conv2d_forward(x, weight, in_scale, out_scale, noise, bias, act, alpha, gain,
                             clamp, padding):
    """``clamp(act(out_scale * conv2d(x * in_scale, weight) + noise + bias) * gain)``."""
    _check_tensor("x", x)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D [N, I, H, W], got shape {list(x.shape)}")
    _check_tensor("weight", weight, x.device)
    if weight.ndim != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [O, {x.shape[1]}, kh, kw], got {list(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must have x's dtype ({x.dtype}) or float32, got {weight.dtype}")
    n, o = x.shape[0], weight.shape[0]
    _check_tensor("in_scale", in_scale, x.device, (torch.float32,))
    if in_scale.shape != (n, x.shape[1]):
        raise ValueError(f"in_scale must be [{n}, {x.shape[1]}], got {list(in_scale.shape)}")
    _check_optional("out_scale", out_scale, x.device, (torch.float32,))
    if out_scale is not None and out_scale.shape != (n, o):
        raise ValueError(f"out_scale must be [{n}, {o}], got {list(out_scale.shape)}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    out_h = x.shape[2] + 2 * padding - weight.shape[2] + 1
    out_w = x.shape[3] + 2 * padding - weight.shape[3] + 1
    _check_optional("noise", noise, x.device)
    if noise is not None and noise.shape != (n, 1, out_h, out_w):
        raise ValueError(f"noise must be [{n}, 1, {out_h}, {out_w}], got {list(noise.shape)}")
    _check_optional("bias", bias, x.device)
    if bias is not None and bias.shape != (o,):
        raise ValueError(f"bias must be [{o}], got {list(bias.shape)}")
    _check_act(act, ("linear", "relu", "lrelu"))
    return _ops().modulated_conv2d_forward(x, weight, in_scale, out_scale, noise, bias, act,
                                           float(alpha), float(gain), _clamp_arg(clamp),
                                           int(padding))


def diffusion_noise_forward(x, x_scale, noise_scale, noise, seed, offset):
    """``x_scale[n] * x[n] + noise_scale[n] * eps[n]``; eps = noise, or Philox N(0, 1) keyed by
    (seed, offset + flat index) when noise is None; noise_scale None gives ``x_scale * x``."""
    _check_tensor("x", x)
    if x.ndim < 1:
        raise ValueError("x must have a batch axis (rank >= 1)")
    _check_per_sample("x_scale", x_scale, x)
    if noise_scale is not None:
        _check_per_sample("noise_scale", noise_scale, x)
    if noise is not None:
        _check_tensor("noise", noise, x.device)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have x's shape {list(x.shape)}, got {list(noise.shape)}")
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or not 0 <= offset < 2 ** 63:
        raise ValueError(f"offset must be an int in [0, 2**63), got {offset!r}")
    return _ops().diffusion_noise_forward(x, x_scale, noise_scale, noise, seed, offset)
