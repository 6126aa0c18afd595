"""Loading NVIDIA StyleGAN2-ADA / Diffusion-GAN network pickles without running their code.

The test writes pickles in NVIDIA's format: each network is pickled as a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class',
version=6, module_src=<source of training/networks.py>, class_name=..., state=<__dict__>)``,
constructor kwargs as ``dnnlib.util.EasyDict``, and weights as plain-pickled tensors.
"""
import collections
import contextlib
import copy
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from batikfast.augment import AugmentPipe
from batikfast.networks import Discriminator, Generator, load_nvidia
from batikfast.diffusion import Diffusion
from batikfast.networks.nvidia import OpaqueObject, read_nvidia_pickle

G_KWARGS = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                mapping_kwargs=dict(num_layers=2),
                synthesis_kwargs=dict(channel_base=64, channel_max=8, num_fp16_res=1,
                                      conv_clamp=256, fp16_channels_last=False))
D_KWARGS = dict(c_dim=0, img_resolution=8, img_channels=3, architecture="resnet",
                channel_base=64, channel_max=8, num_fp16_res=1, conv_clamp=256,
                block_kwargs=dict(freeze_layers=0), mapping_kwargs=dict(num_layers=1),
                epilogue_kwargs=dict(mbstd_group_size=2))


@contextlib.contextmanager
def nvidia_modules():
    """Stand-ins for NVIDIA's ``torch_utils.persistence`` and ``dnnlib.util``, present only
    while the test pickles (the loader must not need them)."""

    def _reconstruct_persistent_obj(meta):  # never called: only its name is pickled
        raise AssertionError("NVIDIA's reconstruction hook must not run")

    class EasyDict(dict):
        pass

    made = {}
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        made[name] = types.ModuleType(name)
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    made["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    made["dnnlib.util"].EasyDict = EasyDict
    with temporary_modules(made):
        yield _reconstruct_persistent_obj, EasyDict


@contextlib.contextmanager
def temporary_modules(modules: dict):
    """``modules`` (name -> module) in sys.modules while the block runs, then as before."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# Executing this "module source" would leave a marker file: the loader must never do it.
MODULE_SRC = "import pathlib\npathlib.Path({marker!r}).write_text('executed')\n"


class Persistent:
    def __init__(self, reconstruct, meta):
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


def as_persistent(module, reconstruct, easydict, module_src, init_kwargs=None):
    """NVIDIA's pickled form of ``module``: its __dict__ with children made persistent too."""
    state = {key: value for key, value in module.__dict__.items()
             if not isinstance(value, torch.dtype)}
    state["_modules"] = collections.OrderedDict(
        (name, as_persistent(child, reconstruct, easydict, module_src))
        for name, child in module._modules.items())
    state["_parameters"] = collections.OrderedDict(module._parameters)
    state["_buffers"] = collections.OrderedDict(module._buffers)
    if hasattr(module, "weight_gain"):
        state["weight_gain"] = np.float64(module.weight_gain)  # NVIDIA stores numpy scalars
    state["_init_args"] = ()
    state["_init_kwargs"] = easydict(
        {k: easydict(v) if isinstance(v, dict) else v for k, v in (init_kwargs or {}).items()})
    meta = dict(type="class", version=6, module_src=module_src,
                class_name=type(module).__name__, state=state)
    return Persistent(reconstruct, meta)


def write_snapshot(path, marker, G, D, G_kwargs, D_kwargs, augment_p=0.3):
    src = MODULE_SRC.format(marker=str(marker))
    with nvidia_modules() as (reconstruct, easydict):
        pipe_state = dict(_parameters=collections.OrderedDict(),
                          _buffers=collections.OrderedDict(p=torch.tensor(augment_p)),
                          _modules=collections.OrderedDict(), _init_args=(),
                          _init_kwargs=easydict(xflip=1, rotate90=1, brightness=1, noise=0))
        snapshot = dict(
            G=as_persistent(G, reconstruct, easydict, src, G_kwargs),
            D=as_persistent(D, reconstruct, easydict, src, D_kwargs),
            G_ema=as_persistent(G, reconstruct, easydict, src, G_kwargs),
            augment_pipe=Persistent(reconstruct, dict(type="class", version=6, module_src=src,
                                                      class_name="AugmentPipe",
                                                      state=pipe_state)),
            training_set_kwargs=easydict(resolution=8, use_labels=False))
        with open(path, "wb") as handle:
            pickle.dump(snapshot, handle, protocol=pickle.DEFAULT_PROTOCOL)


def nvidia_generator():
    kwargs = copy.deepcopy(G_KWARGS)
    kwargs["synthesis_kwargs"].pop("fp16_channels_last")
    torch.manual_seed(0)
    G = Generator(**kwargs)
    for name, tensor in G.state_dict().items():  # make every tensor distinctive
        tensor.copy_(torch.randn_like(tensor))
    return G


@pytest.mark.parametrize("t_dim", [1, 0], ids=["diffusion_gan", "stylegan2_ada"])
def test_snapshot_loads_into_batikfast_networks_without_running_its_code(tmp_path, t_dim):
    marker = tmp_path / "marker"
    G = nvidia_generator()
    D_kwargs = copy.deepcopy(D_KWARGS)
    D_kwargs["block_kwargs"].pop("freeze_layers")
    D = Discriminator(t_dim=t_dim, **D_kwargs)
    path = tmp_path / "network-snapshot.pkl"
    # Diffusion-GAN does not store t_dim in the kwargs: the loader infers it from the weights.
    write_snapshot(path, marker, G, D, G_KWARGS, D_KWARGS)

    loaded = load_nvidia(path)
    assert not marker.exists(), "the embedded module source must never be executed"
    assert isinstance(loaded["G"], Generator) and isinstance(loaded["D"], Discriminator)
    assert loaded["D"].t_dim == t_dim
    for name, tensor in G.state_dict().items():
        assert torch.equal(loaded["G_ema"].state_dict()[name], tensor), name
    for name, tensor in D.state_dict().items():
        assert torch.equal(loaded["D"].state_dict()[name], tensor), name
    assert isinstance(loaded["augment_pipe"], AugmentPipe)
    assert loaded["augment_pipe"].p == pytest.approx(0.3) and loaded["augment_pipe"].xflip == 1
    assert loaded["training_set_kwargs"] == {"resolution": 8, "use_labels": False}

    z = torch.randn(2, 8)
    G.eval()
    expected = G(z, None, noise_mode="const")
    torch.testing.assert_close(loaded["G_ema"](z, None, noise_mode="const"), expected)
    t = torch.tensor([0, 3])
    torch.testing.assert_close(loaded["D"](expected, None, t), D(expected, None, t))


def test_record_keeps_the_source_as_inert_text(tmp_path):
    marker = tmp_path / "marker"
    G = nvidia_generator()
    path = tmp_path / "g.pkl"
    write_snapshot(path, marker, G, Discriminator(**{k: v for k, v in D_KWARGS.items()
                                                     if k != "block_kwargs"}),
                   G_KWARGS, D_KWARGS)
    contents = read_nvidia_pickle(path)
    record = contents["G"]
    assert record.class_name == "Generator" and "pathlib" in record.module_src
    assert record.init_kwargs["mapping_kwargs"] == {"num_layers": 2}
    assert "fp16_channels_last" not in record.init_kwargs["synthesis_kwargs"]
    assert not marker.exists()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_carrying_a_code_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"G": Payload(marker)}, handle)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to call (posix|nt|os)\.system"):
        load_nvidia(path)
    assert not marker.exists()


def test_payload_hidden_inside_a_network_record_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    G = nvidia_generator()
    path = tmp_path / "evil.pkl"
    with nvidia_modules() as (reconstruct, easydict):
        record = as_persistent(G, reconstruct, easydict, "", G_KWARGS)
        record.meta["state"]["_init_kwargs"]["mapping_kwargs"] = Payload(marker)
        with open(path, "wb") as handle:
            pickle.dump({"G": record}, handle)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        load_nvidia(path)
    assert not marker.exists()


def test_mismatched_architecture_is_reported_by_name(tmp_path):
    G = nvidia_generator()
    kwargs = copy.deepcopy(G_KWARGS)
    kwargs["mapping_kwargs"] = dict(num_layers=3)  # the weights have 2 mapping layers
    path = tmp_path / "g.pkl"
    write_snapshot(path, tmp_path / "marker", G, Discriminator(
        **{k: v for k, v in D_KWARGS.items() if k != "block_kwargs"}), kwargs, D_KWARGS)
    with pytest.raises(ValueError, match="mapping.fc2"):
        load_nvidia(path)


def popen_on_load(marker) -> bytes:
    """A pickle whose NEWOBJ opcode asks for ``subprocess.Popen.__new__(Popen, [...])``."""
    def text(value):
        data = value.encode()
        return pickle.BINUNICODE + len(data).to_bytes(4, "little") + data

    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"subprocess\nPopen\n" + pickle.MARK
            + pickle.MARK + text("touch") + text(str(marker)) + pickle.LIST + pickle.TUPLE
            + pickle.NEWOBJ + pickle.STOP)


def test_objects_of_unknown_classes_stay_inert_data(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "odd.pkl"
    path.write_bytes(popen_on_load(marker))
    loaded = load_nvidia(path)
    assert isinstance(loaded, OpaqueObject) and loaded.global_name == "subprocess.Popen"
    assert loaded.new_args == (["touch", str(marker)],)
    assert not marker.exists()


def test_diffusion_gan_snapshot_with_its_diffusion_object_loads(tmp_path):
    """Diffusion-GAN snapshots also hold the Diffusion module (with a non-persistent child,
    numpy arrays and numpy scalars) and a ``progress`` dict of tensors."""
    identity_module = types.ModuleType("training.diffusion")

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    Identity.__module__, Identity.__qualname__ = "training.diffusion", "Identity"
    identity_module.Identity = Identity
    reference = Diffusion(p=0.25)
    path = tmp_path / "best_model.pkl"
    training_modules = {"training": types.ModuleType("training"),
                        "training.diffusion": identity_module}
    with temporary_modules(training_modules):
        with nvidia_modules() as (reconstruct, easydict):
            state = dict(_parameters=collections.OrderedDict(), _buffers=collections.OrderedDict(),
                         _modules=collections.OrderedDict(aug=Identity()), _init_args=(),
                         _init_kwargs=easydict(beta_schedule="linear", t_min=10, t_max=1000,
                                               noise_std=0.05, aug="no", ts_dist="priority"),
                         p=np.float64(0.25), t_epl=np.zeros(64, dtype=np.int64),
                         betas=reference.betas.float(), noise_std=0.05)
            diffusion = Persistent(reconstruct, dict(type="class", version=6, module_src="",
                                                     class_name="Diffusion", state=state))
            progress = dict(cur_nimg=torch.LongTensor([4000]), cur_p=torch.FloatTensor([0.25]),
                            best_fid=30.5)
            with open(path, "wb") as handle:
                pickle.dump(dict(diffusion=diffusion, progress=progress), handle)
    loaded = load_nvidia(path)
    assert isinstance(loaded["diffusion"], Diffusion)
    assert loaded["diffusion"].p == 0.25 and loaded["diffusion"].T == reference.T
    assert loaded["progress"]["cur_nimg"].item() == 4000
    record = read_nvidia_pickle(path)["diffusion"]
    assert isinstance(record.state["_modules"]["aug"], OpaqueObject)
    assert record.state["t_epl"].shape == (64,) and record.state["p"] == 0.25


def test_a_stylegan3_repository_stylegan2_pickle_loads_with_its_fused_modconv_default(tmp_path):
    # NVIDIA's stylegan3 repository trains StyleGAN2 (--cfg=stylegan2) with
    # G_kwargs.fused_modconv_default='inference_only': only a choice of the reference's
    # computation path (same result), which batikfast makes itself.
    G = nvidia_generator()
    kwargs = copy.deepcopy(G_KWARGS)
    kwargs["synthesis_kwargs"]["fused_modconv_default"] = "inference_only"
    path = tmp_path / "sg3.pkl"
    write_snapshot(path, tmp_path / "marker", G, Discriminator(
        **{k: v for k, v in D_KWARGS.items() if k != "block_kwargs"}), kwargs, D_KWARGS)
    loaded = load_nvidia(path)["G_ema"]
    z = torch.randn(2, 8)
    torch.testing.assert_close(loaded(z, None, noise_mode="const"),
                               G.eval()(z, None, noise_mode="const"))


def test_the_pickled_w_avg_beta_is_kept_when_the_kwargs_leave_it_to_the_class_default(tmp_path):
    # The stylegan3 repository's StyleGAN2 MappingNetwork defaults to w_avg_beta=0.998 (ADA's to
    # 0.995) and its pickles' kwargs leave it out; the pickled mapping network holds the value.
    kwargs = copy.deepcopy(G_KWARGS)
    kwargs["synthesis_kwargs"].pop("fp16_channels_last")
    kwargs["mapping_kwargs"]["w_avg_beta"] = 0.998
    G = Generator(**kwargs)
    path = tmp_path / "beta.pkl"
    write_snapshot(path, tmp_path / "marker", G, Discriminator(
        **{k: v for k, v in D_KWARGS.items() if k != "block_kwargs"}), G_KWARGS, D_KWARGS)
    assert load_nvidia(path)["G"].mapping.w_avg_beta == 0.998
