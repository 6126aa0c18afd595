"""Load NVIDIA StyleGAN2-ADA and Diffusion-GAN network pickles without running their code.

Their ``network-snapshot-*.pkl`` files are pickles of ``dict(G=..., D=..., G_ema=...,
augment_pipe=..., ...)`` in which every network is a "persistent object" of
``torch_utils.persistence``: a call to ``_reconstruct_persistent_obj(meta)`` whose ``meta``
carries the Python source of the defining module (``module_src``), the class name and the
object's ``__dict__`` (parameters, buffers, child modules, constructor arguments). NVIDIA's own
loader executes ``module_src``. We never do: a restricted unpickler admits only the handful of
globals such files need (tensor and storage rebuilding, ``OrderedDict``, numpy scalars,
``dnnlib.EasyDict`` read as a plain dict, the persistence hook read as a plain record). Any
other class is replaced by an inert stand-in that keeps the pickled state as data (Diffusion-GAN
snapshots hold e.g. a ``training.diffusion.Identity``), and calling any other global -- the way
a code payload runs -- raises before anything runs.
Storages are read with ``torch.load(weights_only=True)``. The records then become batikfast
networks built from their constructor arguments, with the weights copied by name (the
parameter names are the same).
"""
from __future__ import annotations

import collections
import inspect
import io
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

from batikfast.networks.discriminator import Discriminator
from batikfast.networks.generator import Generator

# Constructor options of NVIDIA's code that only concern memory layout, training or the
# reference's choice between equivalent computation paths (not the result or the weights);
# batikfast does not take them. fused_modconv_default comes with the stylegan3 repository's
# StyleGAN2 pickles (--cfg=stylegan2); batikfast picks the path itself, with the same result.
_DROPPED_KWARGS = {"fp16_channels_last", "channels_last", "freeze_layers",
                   "fused_modconv_default"}


class PlainDict(dict):
    """Stands in for ``dnnlib.EasyDict``: a dict that also reads keys as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


@dataclass
class PersistentRecord:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` describes, as data."""

    class_name: str
    module_src: str
    state: dict
    version: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args", ()))

    @property
    def init_kwargs(self) -> dict:
        return _plain(self.state.get("_init_kwargs", {}))


def _persistent_record(meta) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("malformed persistent object record (expected type 'class')")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"persistent object {meta.get('class_name')!r} has no state")
    return PersistentRecord(class_name=str(meta.get("class_name")),
                            module_src=str(meta.get("module_src", "")), state=state,
                            version=meta.get("version"))


def _load_storage(data: bytes):
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a tensor storage must be stored as bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"expected a tensor storage, got {type(storage).__name__}")
    if isinstance(storage, torch.TypedStorage):
        dtype, untyped = storage.dtype, storage._untyped_storage
    else:
        dtype, untyped = torch.uint8, storage
    tensor = torch.empty(0, dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))
    return tensor.requires_grad_(bool(requires_grad)) if tensor.is_floating_point() else tensor


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, *state):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter must wrap a tensor")
    return torch.nn.Parameter(data.detach(), requires_grad=bool(requires_grad))


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or \
            not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"refusing a numpy scalar of dtype {dtype!r}")
    return np.frombuffer(bytes(data), dtype=dtype)[0].item()


def _numpy_dtype(spec, align=False, copy=True):
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"refusing a numpy dtype built from {spec!r}")
    dtype = np.dtype(spec)
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing numpy dtype {spec!r}")
    return dtype


def _numpy_array(subtype, shape, dtype_code):
    """``numpy.core.multiarray._reconstruct``; the array's contents arrive via __setstate__."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("refusing a numpy array subclass")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _rebuild_from_type(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2`` restricted to plain tensors and parameters."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or \
            new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError("refusing a tensor rebuilt by an unknown function or type")
    tensor = func(*args)
    if new_type is torch.nn.Parameter and not isinstance(tensor, torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
    return tensor


class _OpaqueClass(type):
    """Metaclass of the stand-ins for classes the loader does not import: calling one (what a
    pickle does to run a function or build an object by calling its class) is refused."""

    def __call__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(
            f"refusing to call {cls.global_name}: load_nvidia reads only network weights and "
            "never runs code from the file (is this a StyleGAN2-ADA or Diffusion-GAN network "
            "pickle?)")


class OpaqueObject(metaclass=_OpaqueClass):
    """An object of a class that is not imported (say ``training.diffusion.Identity``): its
    pickled state, kept as data."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):  # what pickle's NEWOBJ does; runs nothing of the class
        obj = object.__new__(cls)
        obj.new_args, obj.state = args, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.global_name}>"


_opaque_classes: dict = {}


def _opaque_class(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _opaque_classes:
        _opaque_classes[key] = _OpaqueClass(name, (OpaqueObject,), {"global_name": key})
    return _opaque_classes[key]


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (pickle protocols 0 and 1) for stand-ins and plain dicts."""
    if isinstance(cls, _OpaqueClass):
        obj = cls.__new__(cls)
        obj.state = state
        return obj
    if cls in (PlainDict, collections.OrderedDict) and base is dict:
        return cls(state or {})
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


_TORCH_DTYPES = {name: getattr(torch, name) for name in (
    "float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
    "bool")}

_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("dnnlib", "EasyDict"): PlainDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
    **{("torch", name): dtype for name, dtype in _TORCH_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles NVIDIA network pickles as data.

    The globals such files need map to safe stand-ins. Any other global becomes an inert
    :class:`OpaqueObject` class: objects of it keep their pickled state as data, and calling
    it (how a code payload runs: ``os.system(...)``, ``eval(...)``) raises.
    """

    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        return allowed if allowed is not None else _opaque_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by NVIDIA network pickles; "
                                     "refusing the file")


def read_nvidia_pickle(file) -> object:
    """The pickle's contents as data: networks become :class:`PersistentRecord`."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as handle:
            return RestrictedUnpickler(handle).load()
    return RestrictedUnpickler(file).load()


def _plain(value):
    """EasyDicts and OrderedDicts to plain dicts, recursively; drop layout-only options."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if key not in _DROPPED_KWARGS}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


def record_state_dict(record: PersistentRecord, prefix: str = "") -> dict:
    """The parameters and persistent buffers of a record and its children, by dotted name."""
    state = record.state
    tensors = {}
    skipped = set(state.get("_non_persistent_buffers_set", ()) or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and name not in skipped:
                tensors[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise ValueError(f"unexpected child module {prefix + name} of type "
                             f"{type(child).__name__} in the pickle")
        tensors.update(record_state_dict(child, prefix + name + "."))
    return tensors


def _discriminator_kwargs(kwargs: dict, weights: dict) -> dict:
    if "t_dim" not in kwargs:
        # StyleGAN2-ADA has no t; Diffusion-GAN's D maps [c, t] (its default t_dim = 1).
        embed = weights.get("mapping.embed.weight")
        c_dim = kwargs.get("c_dim", 0)
        kwargs["t_dim"] = embed.shape[1] - c_dim if embed is not None else 0
    return kwargs


def _generator_kwargs(record: PersistentRecord, kwargs: dict) -> dict:
    """The pickle's kwargs leave w_avg_beta to the class default, which differs between NVIDIA's
    codes (StyleGAN2-ADA 0.995, the stylegan3 repository's StyleGAN2 0.998): take the value the
    pickled mapping network holds."""
    mapping = (record.state.get("_modules") or {}).get("mapping")
    mapping_kwargs = dict(kwargs.get("mapping_kwargs") or {})
    if isinstance(mapping, PersistentRecord) and "w_avg_beta" not in mapping_kwargs and \
            "w_avg_beta" in mapping.state:
        beta = mapping.state["w_avg_beta"]
        mapping_kwargs["w_avg_beta"] = None if beta is None else float(beta)
        kwargs = {**kwargs, "mapping_kwargs": mapping_kwargs}
    return kwargs


def network_from_record(record: PersistentRecord, device="cpu") -> torch.nn.Module:
    """Build the batikfast network a Generator / Discriminator record describes."""
    weights = record_state_dict(record)
    kwargs = record.init_kwargs
    if record.class_name == "Generator":
        network = Generator(*record.init_args, **_generator_kwargs(record, kwargs))
    elif record.class_name == "Discriminator":
        network = Discriminator(*record.init_args, **_discriminator_kwargs(kwargs, weights))
    else:
        raise ValueError(f"no batikfast network for NVIDIA class {record.class_name!r}")
    expected = network.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the {record.class_name} in the pickle does not match batikfast's "
                         f"architecture: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{record.class_name}.{name}: shape {tuple(tensor.shape)} in the "
                             f"pickle, {tuple(expected[name].shape)} in batikfast")
    network.load_state_dict(weights)
    return network.to(device).eval().requires_grad_(False)


def _augment_pipe_from_record(record: PersistentRecord):
    from batikfast.augment import AugmentPipe

    accepted = inspect.signature(AugmentPipe).parameters
    kwargs = {k: v for k, v in record.init_kwargs.items() if k in accepted}
    pipe = AugmentPipe(*record.init_args, **kwargs)
    p = (record.state.get("_buffers") or {}).get("p")
    if p is not None:
        pipe.p = float(p)
    return pipe


def _diffusion_from_record(record: PersistentRecord):
    """Diffusion-GAN's ``Diffusion`` object as a :class:`batikfast.diffusion.Diffusion` with
    its schedule options and its p (hence T)."""
    from batikfast.diffusion import Diffusion

    accepted = inspect.signature(Diffusion).parameters
    kwargs = {k: v for k, v in record.init_kwargs.items() if k in accepted}
    diffusion = Diffusion(**kwargs)
    p = record.state.get("p")
    if p is not None:
        diffusion.p = min(max(float(p), 0.0), 1.0)
        diffusion.update_T()
    return diffusion


def load_nvidia(path, device="cpu"):
    """Load an NVIDIA StyleGAN2-ADA or Diffusion-GAN network pickle as batikfast networks.

    Returns, for a snapshot dict, the same dict with ``G``, ``D``, ``G_ema`` as batikfast
    :class:`Generator` / :class:`Discriminator` (eval mode, no grad), ``augment_pipe`` as a
    :class:`batikfast.augment.AugmentPipe`, Diffusion-GAN's ``diffusion`` as a
    :class:`batikfast.diffusion.Diffusion` (its p and T), other persistent objects left as
    :class:`PersistentRecord` and objects of other classes as :class:`OpaqueObject`; for a
    pickle of a single network, that network. Never executes code from the file; raises
    :class:`pickle.UnpicklingError` if the file tries to call anything but the tensor and
    container rebuilders.
    """
    contents = read_nvidia_pickle(path)

    def convert(value):
        if not isinstance(value, PersistentRecord):
            return _plain(value) if isinstance(value, dict) else value
        if value.class_name in ("Generator", "Discriminator"):
            return network_from_record(value, device)
        if value.class_name == "AugmentPipe":
            return _augment_pipe_from_record(value)
        if value.class_name == "Diffusion":
            return _diffusion_from_record(value)
        return value

    if isinstance(contents, dict):
        return {key: convert(value) for key, value in contents.items()}
    return convert(contents)
