"""The layer shapes the benchmarks run: paper256 generator and discriminator, a sweep, tiny.

Pure geometry (no torch). paper256 is StyleGAN2's 256x256 config as the batik paper trains
it: channel_base 16384, channel_max 512, so a layer at resolution r has
``min(16384 // r, 512)`` channels (512 at 4..32, 256 at 64, 128 at 128, 64 at 256),
3x3 convolutions, [1, 3, 3, 1] resampling filters, conv_clamp 256, lrelu with gain sqrt(2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

CHANNEL_BASE = 16384
CHANNEL_MAX = 512
G_RESOLUTIONS = (4, 8, 16, 32, 64, 128, 256)
D_RESOLUTIONS = (256, 128, 64, 32, 16, 8)
CONV_CLAMP = 256.0
IMG_CHANNELS = 3
DIFFUSION_STEPS = 1000
SHAPE_SETS = ("paper256-g", "paper256-d", "sweep", "tiny")


def channels(res: int) -> int:
    return min(CHANNEL_BASE // res, CHANNEL_MAX)


@dataclass(frozen=True)
class Case:
    """One benchmarked call: an op at one geometry (the batch is filled in per run).

    ``params`` holds everything the op runner needs besides batch and dtype, e.g.
    ``{"channels": 512, "res": 8}`` for bias_act or the conv geometry for modulated_conv2d.
    """
    op: str
    name: str
    shape_set: str
    params: dict = field(hash=False, compare=False)

    def describe(self, batch: int) -> str:
        p = self.params
        if self.op in ("modulated_conv2d", "conv2d_resample"):
            resample = f" up{p['up']}" if p.get("up", 1) > 1 else ""
            resample += f" down{p['down']}" if p.get("down", 1) > 1 else ""
            return (f"[{batch},{p['in_channels']},{p['in_res']},{p['in_res']}] "
                    f"{p['kernel']}x{p['kernel']} -> {p['out_channels']}{resample}")
        if self.op == "upfirdn2d":
            return f"[{batch},{p['channels']},{p['res']},{p['res']}] {p['mode']}"
        return f"[{batch},{p['channels']},{p['res']},{p['res']}]"


def _synthesis_layer(name, shape_set, in_channels, out_channels, in_res, up, kernel=3,
                     demodulate=True, act="lrelu", noise=True) -> Case:
    return Case("modulated_conv2d", name, shape_set, dict(
        in_channels=in_channels, out_channels=out_channels, in_res=in_res,
        out_res=in_res * up, kernel=kernel, up=up, down=1, demodulate=demodulate, act=act,
        noise=noise, clamp=CONV_CLAMP))


def generator_cases(resolutions=G_RESOLUTIONS, shape_set="paper256-g") -> list[Case]:
    """Every synthesis layer, its bias_act, and the up-sampling of activations and skip image."""
    cases = []
    for res in resolutions:
        ch = channels(res)
        if res > resolutions[0]:
            cases.append(_synthesis_layer(f"G.b{res}.conv0", shape_set, channels(res // 2), ch,
                                          res // 2, up=2))
        cases.append(_synthesis_layer(f"G.b{res}.conv1", shape_set, ch, ch, res, up=1))
        cases.append(_synthesis_layer(f"G.b{res}.torgb", shape_set, ch, IMG_CHANNELS, res, up=1,
                                      kernel=1, demodulate=False, act="linear", noise=False))
    for res in resolutions:
        cases.append(Case("bias_act", f"G.b{res}.act", shape_set,
                          dict(channels=channels(res), res=res, act="lrelu", clamp=CONV_CLAMP)))
    for res in resolutions[:-1]:
        cases.append(Case("upfirdn2d", f"G.b{res}.up2", shape_set,
                          dict(channels=channels(res), res=res, mode="up2")))
        cases.append(Case("upfirdn2d", f"G.b{res}.img_up2", shape_set,
                          dict(channels=IMG_CHANNELS, res=res, mode="up2")))
    return cases


def discriminator_cases(resolutions=D_RESOLUTIONS, shape_set="paper256-d",
                        image_res: int = 256) -> list[Case]:
    """The resampling convolutions, down-sampling and bias_act of D, and the diffusion noising.

    The stride-1 3x3 convolutions (conv0) run in cuDNN whatever the backend, so they are not
    listed; the down-sampling ones (conv1 3x3, skip 1x1) go through upfirdn2d.
    """
    cases = [Case("diffusion_noise", f"D.diffusion_noise", shape_set,
                  dict(channels=IMG_CHANNELS, res=image_res))]
    for res in resolutions:
        tmp, out = channels(res), channels(res // 2)
        cases.append(Case("conv2d_resample", f"D.b{res}.conv1", shape_set, dict(
            in_channels=tmp, out_channels=out, in_res=res, out_res=res // 2, kernel=3, up=1,
            down=2)))
        cases.append(Case("conv2d_resample", f"D.b{res}.skip", shape_set, dict(
            in_channels=tmp, out_channels=out, in_res=res, out_res=res // 2, kernel=1, up=1,
            down=2)))
        cases.append(Case("upfirdn2d", f"D.b{res}.down2", shape_set,
                          dict(channels=tmp, res=res, mode="down2")))
        cases.append(Case("bias_act", f"D.b{res}.act", shape_set,
                          dict(channels=tmp, res=res, act="lrelu", clamp=CONV_CLAMP)))
    return cases


def sweep_cases() -> list[Case]:
    """Sizes off the paper256 path: how each op scales from launch-bound to bandwidth-bound."""
    cases = []
    for channels_, res in ((64, 16), (128, 32), (128, 64), (256, 64), (128, 128), (64, 256),
                           (128, 256), (256, 256)):
        cases.append(Case("bias_act", f"sweep.act.{channels_}x{res}", "sweep",
                          dict(channels=channels_, res=res, act="lrelu", clamp=CONV_CLAMP)))
    for res in (16, 32, 64, 128, 256):
        cases.append(Case("upfirdn2d", f"sweep.up2.128x{res}", "sweep",
                          dict(channels=128, res=res, mode="up2")))
        cases.append(Case("upfirdn2d", f"sweep.down2.128x{res}", "sweep",
                          dict(channels=128, res=res, mode="down2")))
    for ch in (64, 128, 256, 512):
        cases.append(_synthesis_layer(f"sweep.modconv.{ch}x32", "sweep", ch, ch, 32, up=1))
    for res in (64, 256, 512):
        cases.append(Case("diffusion_noise", f"sweep.noise.3x{res}", "sweep",
                          dict(channels=IMG_CHANNELS, res=res)))
    return cases


def tiny_cases() -> list[Case]:
    """One small case per op and variant, for the CPU quick run (interpreted Triton is slow)."""
    return [
        Case("bias_act", "tiny.act", "tiny", dict(channels=8, res=8, act="lrelu",
                                                  clamp=CONV_CLAMP)),
        Case("upfirdn2d", "tiny.up2", "tiny", dict(channels=2, res=8, mode="up2")),
        Case("upfirdn2d", "tiny.down2", "tiny", dict(channels=2, res=8, mode="down2")),
        _synthesis_layer("tiny.modconv", "tiny", 8, 8, 8, up=1),
        _synthesis_layer("tiny.modconv_up2", "tiny", 4, 4, 4, up=2),
        Case("conv2d_resample", "tiny.conv_down2", "tiny", dict(
            in_channels=4, out_channels=4, in_res=8, out_res=4, kernel=3, up=1, down=2)),
        Case("diffusion_noise", "tiny.noise", "tiny", dict(channels=IMG_CHANNELS, res=16)),
    ]


def cases_for(shape_set: str) -> list[Case]:
    if shape_set == "paper256-g":
        return generator_cases()
    if shape_set == "paper256-d":
        return discriminator_cases()
    if shape_set == "sweep":
        return sweep_cases()
    if shape_set == "tiny":
        return tiny_cases()
    raise ValueError(f"shapes must be among {SHAPE_SETS}, got {shape_set!r}")
