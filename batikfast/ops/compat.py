"""The module layout of NVIDIA's ``torch_utils.ops`` over batikfast's ops: a one-import switch.

NVIDIA's StyleGAN code imports op *modules* and calls functions inside them::

    from torch_utils.ops import bias_act, conv2d_resample, upfirdn2d
    bias_act.bias_act(x, b, act="lrelu")
    upfirdn2d.setup_filter([1, 3, 3, 1])
    bias_act.activation_funcs["lrelu"].def_gain

``batikfast.ops`` holds the functions themselves (``ops.bias_act(...)``), so the same import from
there gives functions, not modules. Importing the names from here instead gives objects shaped
like NVIDIA's modules, and those calls run unchanged on batikfast's ops (backend chosen as
usual). NVIDIA's other helpers (``fma``, ``conv2d_gradfix``, ``grid_sample_gradfix``) are not
batikfast ops and stay NVIDIA's.
"""
import types

from batikfast.ops.bias_act import ACTIVATIONS as _ACTIVATIONS
from batikfast.ops.bias_act import bias_act as _bias_act
from batikfast.ops.conv2d_resample import conv2d_resample as _conv2d_resample
from batikfast.ops.upfirdn2d import downsample2d as _downsample2d
from batikfast.ops.upfirdn2d import filter2d as _filter2d
from batikfast.ops.upfirdn2d import setup_filter as _setup_filter
from batikfast.ops.upfirdn2d import upfirdn2d as _upfirdn2d
from batikfast.ops.upfirdn2d import upsample2d as _upsample2d


def _namespace(name: str, **members) -> types.ModuleType:
    module = types.ModuleType(f"{__name__}.{name}", f"NVIDIA's torch_utils.ops.{name}, on batikfast")
    module.__dict__.update(members)
    return module


bias_act = _namespace("bias_act", bias_act=_bias_act, activation_funcs=_ACTIVATIONS)
upfirdn2d = _namespace("upfirdn2d", upfirdn2d=_upfirdn2d, setup_filter=_setup_filter,
                       filter2d=_filter2d, upsample2d=_upsample2d, downsample2d=_downsample2d)
conv2d_resample = _namespace("conv2d_resample", conv2d_resample=_conv2d_resample)

__all__ = ["bias_act", "conv2d_resample", "upfirdn2d"]
