"""Training configurations: the presets behind ``--cfg`` and the options that override them.

A config is a flat JSON-able dict; the run directory keeps it as ``training_options.json`` and
every checkpoint holds it, so ``--resume`` continues with the same settings.

Presets:

* ``paper256``: the batik paper's setup (NVIDIA's paper256: 256x256, channel base 16384, max 512,
  8 mapping layers, minibatch-std group 8, batch 64 in rounds of 16, lr 0.0025, Adam (0, 0.99),
  R1 gamma 1, EMA 20 kimg, mixed precision in the 4 highest resolutions, conv clamp 256,
  x-flips) plus Diffusion-GAN's diffusion (linear betas 1e-4..2e-2, T 10..1000, target 0.6,
  100 kimg, priority t sampling, noise std 0.05).
* ``smoke``: a quick GPU check (64x64, small channels, a few kimg).
* ``tiny``: trains on a 2-core CPU in a couple of minutes (32x32, few channels).
"""
from __future__ import annotations

import copy

class ConfigError(ValueError):
    """A training option, or a combination of them, that cannot work; the message says which."""


PRESETS: dict[str, dict] = {
    "paper256": dict(
        resolution=256, z_dim=512, w_dim=512, map_layers=8, channel_base=16384, channel_max=512,
        mbstd_group=8, num_fp16_res=4, conv_clamp=256, batch=64, batch_gpu=16, glr=0.0025,
        dlr=0.0025, r1_gamma=1.0, pl_weight=2.0, style_mixing=0.9, ema_kimg=20.0,
        ema_rampup=None, kimg=25000, tick_kimg=4.0, snap=50, image_snap=50, precision="fp16"),
    "smoke": dict(
        resolution=64, z_dim=256, w_dim=256, map_layers=2, channel_base=8192, channel_max=256,
        mbstd_group=4, num_fp16_res=2, conv_clamp=256, batch=32, batch_gpu=32, glr=0.0025,
        dlr=0.0025, r1_gamma=0.1, pl_weight=2.0, style_mixing=0.9, ema_kimg=2.0,
        ema_rampup=0.05, kimg=20, tick_kimg=1.0, snap=10, image_snap=5, precision="bf16"),
    "tiny": dict(
        resolution=32, z_dim=32, w_dim=32, map_layers=2, channel_base=512, channel_max=32,
        mbstd_group=4, num_fp16_res=0, conv_clamp=None, batch=8, batch_gpu=8, glr=0.0025,
        dlr=0.0025, r1_gamma=0.05, pl_weight=2.0, style_mixing=0.9, ema_kimg=0.5,
        ema_rampup=0.05, kimg=0.2, tick_kimg=0.04, snap=5, image_snap=5, precision="fp32"),
}

DEFAULTS = dict(
    cfg="paper256", data="builtin", data_size=20000, data_seed=0, mirror=True, cond=False,
    seed=0, loss="stylegan2", aug="no", augpipe="bgc", ada_target=0.6, ada_kimg=500.0,
    diffusion=True, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2, t_min=10,
    t_max=1000, diffusion_target=0.6, diffusion_kimg=100.0, ts_dist="priority", noise_std=0.05,
    adjust_interval=4, g_reg_interval=4, d_reg_interval=16, backend="auto", compile=None,
    cudagraphs=False,
    deterministic=False, workers=None, keep_checkpoints=3, max_nan_skips=10, metrics=[],
    metrics_features=None, metrics_num=10000, grid_seeds=16, device="auto",
    ddp_timeout_s=600.0, stop_after_steps=None, init=None,
)

CHOICES = dict(cfg=tuple(PRESETS), loss=("stylegan2", "wgan"), aug=("no", "ada", "diff"),
               ts_dist=("priority", "uniform"), backend=("auto", "ref", "triton", "cuda"),
               precision=("fp32", "fp16", "bf16"))


def make_config(cfg: str = "paper256", **overrides) -> dict:
    """The preset ``cfg`` with the defaults, then ``overrides`` (None values are ignored)."""
    if cfg not in PRESETS:
        raise ConfigError(f"cfg must be one of {tuple(PRESETS)}, got {cfg!r}")
    config = dict(DEFAULTS)
    config.update(copy.deepcopy(PRESETS[cfg]))
    config["cfg"] = cfg
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in config:
            raise ConfigError(f"unknown training option {key!r}")
        config[key] = value
    if overrides.get("batch") is not None and overrides.get("batch_gpu") is None:
        # the preset's per-GPU batch, shrunk to the largest divisor of the new batch
        batch = int(config["batch"])
        config["batch_gpu"] = max(d for d in range(1, min(config["batch_gpu"], batch) + 1)
                                  if batch % d == 0)
    validate_config(config)
    return config


def validate_config(config: dict) -> None:
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {config[key]!r}")
    res = config["resolution"]
    if res < 4 or res & (res - 1):
        raise ConfigError(f"resolution must be a power of two >= 4, got {res}")
    for key in ("batch", "batch_gpu"):
        if int(config[key]) != config[key] or config[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {config[key]!r}")
    if config["kimg"] <= 0:
        raise ConfigError(f"kimg must be positive, got {config['kimg']}")
    if not config["ddp_timeout_s"] > 0:  # nan too
        raise ConfigError(f"ddp_timeout_s (--ddp-timeout) must be a positive number of seconds, "
                          f"got {config['ddp_timeout_s']!r}")
    if config.get("cudagraphs") not in (None, False, True):
        raise ConfigError(f"cudagraphs must be True or False, got {config['cudagraphs']!r}")
    if config.get("cudagraphs") and config["compile"] is False:
        raise ConfigError("cudagraphs=True needs compile (CUDA graphs are torch.compile's mode "
                         "'reduce-overhead'), got compile=False")
    if config["metrics"]:
        from batikfast.metrics.compute import METRICS, PR_K

        unknown = [m for m in config["metrics"] if m not in METRICS]
        if unknown:
            raise ConfigError(f"metrics must be among {METRICS}, got {unknown}")
        if int(config["metrics_num"]) != config["metrics_num"] or config["metrics_num"] < 2:
            # FID's covariances and KID's subsets need two samples at least
            raise ConfigError(f"metrics_num (--metrics-num) must be an integer of at least 2, "
                              f"got {config['metrics_num']!r}")
        if "pr" in config["metrics"] and config["metrics_num"] <= PR_K:
            raise ConfigError(f"precision/recall (k={PR_K}) needs metrics_num above {PR_K}, got "
                             f"{config['metrics_num']}")
        if not config["metrics_features"]:
            raise ConfigError("metrics need metrics_features (a feature network file; "
                             "batikfast never downloads one)")
    if config["batch"] % config["batch_gpu"]:
        raise ConfigError(f"batch ({config['batch']}) must be a multiple of batch_gpu "
                         f"({config['batch_gpu']})")


def split_batch(config: dict, world_size: int) -> tuple[int, int]:
    """(per-GPU batch per round, rounds of gradient accumulation) for ``world_size`` ranks."""
    batch, batch_gpu = config["batch"], config["batch_gpu"]
    if batch % world_size:
        raise ConfigError(f"batch ({batch}) must be a multiple of the number of processes "
                         f"({world_size})")
    per_rank = batch // world_size
    batch_gpu = min(batch_gpu, per_rank)
    if per_rank % batch_gpu:
        raise ConfigError(f"the per-process batch ({per_rank} = batch {batch} / {world_size} "
                         f"processes) must be a multiple of batch_gpu ({batch_gpu})")
    group = config["mbstd_group"]
    if group and batch_gpu % min(group, batch_gpu):
        raise ConfigError(f"batch_gpu ({batch_gpu}) must be a multiple of the minibatch-std group "
                         f"size ({group})")
    return batch_gpu, per_rank // batch_gpu


def network_kwargs(config: dict, c_dim: int, img_channels: int = 3) -> tuple[dict, dict]:
    """Generator and Discriminator keyword arguments (NVIDIA's names) for ``config``."""
    precision = config["precision"]
    fp16_res = 0 if precision == "fp32" else config["num_fp16_res"]
    dtype = "bfloat16" if precision == "bf16" else "float16"
    common = dict(c_dim=c_dim, img_resolution=config["resolution"], img_channels=img_channels,
                  channel_base=config["channel_base"], channel_max=config["channel_max"],
                  num_fp16_res=fp16_res, conv_clamp=config["conv_clamp"],
                  mixed_precision_dtype=dtype)
    G_kwargs = dict(common, z_dim=config["z_dim"], w_dim=config["w_dim"],
                    mapping_kwargs=dict(num_layers=config["map_layers"]))
    D_kwargs = dict(common, epilogue_kwargs=dict(mbstd_group_size=config["mbstd_group"]))
    return G_kwargs, D_kwargs
