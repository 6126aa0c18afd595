"""Device checks shared by the Triton kernel modules.

Triton compiles for CUDA; CPU tensors are accepted only under Triton's interpreter
(``TRITON_INTERPRET=1``, read when triton is imported), which the tests use without a GPU.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (read on every call: tests change it)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into an index with
    ``int(array)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars", triton-lang/triton#9171), so ``range()`` over a runtime scalar (the K loop
    of modulated_conv2d) fails. Later Triton squeezes first; do the same where it does not."""
    try:
        from triton.runtime import interpreter
        original = interpreter._patch_lang_tensor
        if "int(self.handle.data))" not in inspect.getsource(original):
            return
    except (ImportError, AttributeError, OSError, TypeError):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if interpreting():
    _fix_interpreter_index()


def interpreter_tiles() -> bool:
    """Whether to launch with the small tiles chosen for the interpreter (tiny test tensors then
    span several programs). ``BATIKFAST_INTERPRET_DEVICE_TILES=1`` makes the interpreter launch
    with the block sizes a GPU gets instead, so that the CPU tests also cover the tiling code
    paths that only the GPU would otherwise take."""
    return interpreting() and os.environ.get("BATIKFAST_INTERPRET_DEVICE_TILES", "") != "1"


def check_device(op: str, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """Raise unless ``t`` (argument ``name`` of ``op``) can run on Triton, on ``like``'s device."""
    if t.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(f"{op} (Triton) got {name} on the CPU: it needs CUDA tensors, "
                               "or TRITON_INTERPRET=1 set before triton is imported (slow, for "
                               "tests)")
    elif t.device.type != "cuda":
        raise RuntimeError(f"{op} (Triton) needs CUDA tensors, got {name} on {t.device}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like x, got {t.device}")


def launch_device(t: torch.Tensor):
    """A context that makes ``t``'s GPU the current one for a kernel launch. Triton launches on
    the current device and its current stream, not on the device of the pointers it is given
    (torch's own ops guard the device themselves): a tensor on another GPU would be read from
    the wrong context and out of order with its own stream."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


# CUDA launches at most 2**31 - 1 blocks along grid axis x; the Triton kernels here use a 1-D
# grid, which gets every tensor a GPU can hold well inside it (each program covers hundreds of
# elements or more), so this only guards against sizes past any GPU's memory.
MAX_GRID_X = 2 ** 31 - 1


def grid_x(op: str, programs: int, work: str) -> tuple[int]:
    """The 1-D grid ``(programs,)``; a ValueError naming ``op`` and ``work`` (what the programs
    cover) when CUDA could not launch that many: better than a launch failure or a grid wrapped
    by some driver version."""
    if programs > MAX_GRID_X:
        raise ValueError(f"{op}: {work} need {programs} programs on grid axis x, more than "
                         f"CUDA's {MAX_GRID_X}; split the call")
    return (programs,)
